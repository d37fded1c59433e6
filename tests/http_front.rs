//! The HTTP front under hostile or careless clients: header-read timeouts (silent connections,
//! half headers, idle keep-alive), the node and per-address connection caps (with
//! `X-Forwarded-For` honoured only from trusted proxies), close code 1009 reaching a client that
//! sent a 64 MiB message, and which endpoints the client port and the operator listener serve.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hearth::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn tcp(addr: SocketAddr) -> TcpStream {
    with_timeout(T, "tcp connect", TcpStream::connect(addr))
        .await
        .unwrap()
}

/// Reads until the server closes the connection (end of stream or reset); returns what arrived
/// and how long after `since` the close came. Fails the test if it is still open after `d`.
async fn read_to_close(tcp: &mut TcpStream, since: Instant, d: Duration) -> (String, Duration) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(since + d, tcp.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {d:?}; received {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into(), since.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A WebSocket upgrade of `ws://addr/` with an optional `X-Forwarded-For`; `Err(status)` when
/// the server answered something else than 101.
async fn upgrade(addr: SocketAddr, forwarded_for: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/").into_client_request().unwrap();
    if let Some(xff) = forwarded_for {
        req.headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
    }
    match with_timeout(T, "upgrade", tokio_tungstenite::connect_async(req)).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

fn refused(s: &TestServer, reason: &str) -> u64 {
    s.handle
        .metrics()
        .connections_refused
        .with_label_values(&[reason])
        .get()
}

async fn open_connections_become(s: &TestServer, n: i64) {
    let m = s.handle.metrics().clone();
    wait_until(T, &format!("{n} connections open"), || {
        m.connections_open.get() == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_half_header_and_idle_keepalive_connections_are_closed() {
    let timeout = Duration::from_millis(600);
    let s = start(Config {
        http_header_timeout_ms: timeout.as_millis() as u64,
        ..test_config()
    })
    .await;
    // an upgraded socket is not subject to the header timeout
    let mut ws = RawClient::connect(s.addr).await;
    ws.join("front").await;

    let opened = Instant::now();
    let mut silent = tcp(s.addr).await;
    let mut half = tcp(s.addr).await;
    half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut keep_alive = tcp(s.addr).await;
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = Instant::now();

    // meanwhile a normal client connects, syncs and edits
    assert_syncs(s.addr, "front-live").await;

    let limit = timeout + Duration::from_secs(3);
    let (got, after) = read_to_close(&mut silent, opened, limit).await;
    assert!(got.is_empty(), "{got:?}");
    assert!(after >= timeout / 2, "closed too early: {after:?}");
    let (got, after) = read_to_close(&mut half, opened, limit).await;
    assert!(!got.starts_with("HTTP/1.1 2"), "{got:?}");
    assert!(after >= timeout / 2, "closed too early: {after:?}");
    let (got, after) = read_to_close(&mut keep_alive, answered, limit).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.ends_with("ok\n"), "one answer, then closed: {got:?}");
    assert!(after >= timeout / 2, "closed too early: {after:?}");
    let m = s.handle.metrics().clone();
    wait_until(T, "three header timeouts counted", || {
        m.http_header_timeouts.get() == 3
    })
    .await;

    // only the WebSocket is left, and it still works
    open_connections_become(&s, 1).await;
    let y = YDoc::new(5);
    y.apply(&ws.fetch_state("front").await);
    ws.edit("front", &y.insert("still here")).await;
    ws.close_socket().await;
    open_connections_become(&s, 0).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_cap_answers_429_and_frees_slots_on_close() {
    let s = start(Config {
        max_connections_per_ip: 3,
        ..test_config()
    })
    .await;
    let mut held = Vec::new();
    for i in 0..3 {
        let mut c = RawClient::connect(s.addr).await;
        c.join(&format!("cap-{i}")).await;
        held.push(c);
    }
    assert_eq!(upgrade(s.addr, None).await.err(), Some(429));
    let (status, body) = http_get(s.addr, "/healthz").await;
    assert_eq!(
        (status, body.as_str()),
        (429, "too many connections from this address\n")
    );
    assert_eq!(refused(&s, "ip_limit"), 2);
    open_connections_become(&s, 3).await;

    // a socket closes: its slot is free again
    held.pop().unwrap().close_socket().await;
    open_connections_become(&s, 2).await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("cap-again").await;
    held.push(c);
    for c in held {
        c.close_socket().await;
    }
    open_connections_become(&s, 0).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_refusal_allowance_connections_are_closed_at_once() {
    // the default header timeout (10 s) tells "closed at accept" from "timed out"
    let s = start(Config {
        max_connections_per_ip: 1,
        ..test_config()
    })
    .await;
    let mut c = RawClient::connect(s.addr).await;
    c.join("allowance").await;
    // 32 connections over the cap are held, silent, to be answered 429
    let mut waiting = Vec::new();
    for _ in 0..32 {
        waiting.push(tcp(s.addr).await);
    }
    open_connections_become(&s, 33).await;
    // one more is closed as soon as it is accepted
    let since = Instant::now();
    let mut extra = tcp(s.addr).await;
    let (got, _) = read_to_close(&mut extra, since, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{got:?}");
    // the held ones get their 429 when they ask
    let mut w = waiting.pop().unwrap();
    w.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_to_close(&mut w, Instant::now(), T).await;
    assert!(got.starts_with("HTTP/1.1 429"), "{got:?}");
    assert_eq!(refused(&s, "ip_limit"), 2);
    drop(waiting);
    open_connections_become(&s, 1).await;
    // the within-cap client was never disturbed
    c.edit("allowance", &YDoc::new(9).insert("ok")).await;
    c.close_socket().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cap_closes_connections_at_accept() {
    let s = start(Config {
        max_connections: 2,
        ..test_config()
    })
    .await;
    let mut a = RawClient::connect(s.addr).await;
    a.join("node-cap").await;
    let mut b = RawClient::connect(s.addr).await;
    b.join("node-cap").await;

    let since = Instant::now();
    let mut third = tcp(s.addr).await;
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (got, _) = read_to_close(&mut third, since, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "no answer over the node cap: {got:?}");
    assert_eq!(refused(&s, "node_limit"), 1);
    // the operator listener is not counted and still answers
    assert_eq!(
        metric(s.operator_addr(), "hearth_connections_refused_total").await,
        1.0
    );
    assert_eq!(
        metric(s.operator_addr(), "hearth_connections_open").await,
        2.0
    );

    a.close_socket().await;
    open_connections_become(&s, 1).await;
    assert_eq!(http_get(s.addr, "/healthz").await.0, 200);
    b.edit("node-cap", &YDoc::new(3).insert("b")).await;
    b.close_socket().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_honoured_only_from_trusted_proxies() {
    // the test's connections come from 127.0.0.1: here a trusted proxy
    let s = start(Config {
        max_connections_per_ip: 1,
        trusted_proxies: "127.0.0.1, 10.10.0.0/16".into(),
        ..test_config()
    })
    .await;
    let mut held = Vec::new();
    held.push(upgrade(s.addr, Some("10.0.0.1")).await.unwrap());
    assert_eq!(upgrade(s.addr, Some("10.0.0.1")).await.err(), Some(429));
    held.push(upgrade(s.addr, Some("10.0.0.2")).await.unwrap());
    // a forged left-hand entry does not change who the client is
    assert_eq!(
        upgrade(s.addr, Some("10.0.0.9, 10.0.0.1")).await.err(),
        Some(429)
    );
    // trusted hops are skipped: the client is the right-most untrusted entry
    assert_eq!(
        upgrade(s.addr, Some("10.0.0.2, 10.10.3.4")).await.err(),
        Some(429)
    );
    held.push(upgrade(s.addr, Some("10.0.0.3, 10.10.3.4")).await.unwrap());
    // without the header the proxy itself is the client
    held.push(upgrade(s.addr, None).await.unwrap());
    assert_eq!(upgrade(s.addr, None).await.err(), Some(429));
    open_connections_become(&s, 4).await;
    drop(held);
    open_connections_become(&s, 0).await;
    s.stop().await;

    // no trusted proxies: the header is ignored, every connection is 127.0.0.1's
    let s = start(Config {
        max_connections_per_ip: 1,
        ..test_config()
    })
    .await;
    let first = upgrade(s.addr, Some("10.0.0.1")).await.unwrap();
    assert_eq!(upgrade(s.addr, Some("10.0.0.2")).await.err(), Some(429));
    drop(first);
    open_connections_become(&s, 0).await;
    s.stop().await;
}

/// Sends one 64 MiB binary message on `url` and returns the close code the client observes.
async fn close_code_after_64_mib(url: String) -> Option<u16> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(128 << 20))
        .max_frame_size(Some(128 << 20));
    let (mut ws, _) = with_timeout(
        T,
        "connect",
        tokio_tungstenite::connect_async_with_config(url, Some(config), false),
    )
    .await
    .unwrap();
    let big = vec![7u8; 64 << 20];
    // The server refuses the message as soon as its header arrives, but reads (and discards)
    // the rest: the send completes instead of failing on a reset, as it would if the server
    // closed with unread input — browsers and Node clients report that as 1006.
    with_timeout(
        Duration::from_secs(20),
        "send 64 MiB",
        ws.send(Message::Binary(big.into())),
    )
    .await
    .expect("the whole message is sent; the connection is not reset");
    with_timeout(Duration::from_secs(10), "close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {} // frames sent before the close (y-websocket step1)
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_message_is_closed_with_1009_not_reset() {
    // default limits (8 MiB messages)
    let s = start(test_config()).await;
    assert_eq!(
        close_code_after_64_mib(format!("ws://{}/", s.addr)).await,
        Some(1009),
        "Hocuspocus endpoint"
    );
    assert_eq!(
        close_code_after_64_mib(format!("ws://{}/y/big-message", s.addr)).await,
        Some(1009),
        "y-websocket endpoint"
    );
    assert_eq!(
        s.handle.metrics().closes.with_label_values(&["1009"]).get(),
        2
    );
    assert_syncs(s.addr, "after-1009").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_live_on_the_operator_listener_only() {
    let store = FlakyStore::new();
    let config = Config {
        readiness_outage_ms: 0,
        ..test_config()
    };
    let s = start_with(config, store.clone(), |b| b).await;
    let op = s.operator_addr();
    let mut c = RawClient::connect(s.addr).await;
    c.join("listed").await;

    // client port
    assert_eq!(http_get(s.addr, "/metrics").await.0, 404);
    assert_eq!(http_get(s.addr, "/cluster/owned").await.0, 404);
    assert_eq!(http_get(s.addr, "/nope").await, (404, "Not Found\n".into()));
    assert_eq!(
        http_get(s.addr, "/").await,
        (200, "Welcome to Hearth!".into())
    );
    assert_eq!(http_get(s.addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(s.addr, "/readyz").await, (200, "ready\n".into()));

    // operator listener
    let (status, body) = http_get(op, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("hearth_connections_open 1"), "{body}");
    assert_eq!(
        http_get(op, "/cluster/owned").await,
        (200, "listed\n".into())
    );
    assert_eq!(http_get(op, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(op, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http_get(op, "/").await.0, 404);
    match tokio_tungstenite::connect_async(format!("ws://{op}/")).await {
        Err(WsError::Http(r)) => assert_eq!(r.status().as_u16(), 404),
        other => panic!("upgrade on the operator listener: {:?}", other.map(|_| ())),
    }

    // not ready: the reason only on the operator listener
    store.set_failing(true);
    c.send(update("listed", &YDoc::new(4).insert("unacked")))
        .await;
    wait_until_async(T, "/readyz turns 503", || async {
        http_get(s.addr, "/readyz").await.0 == 503
    })
    .await;
    assert_eq!(
        http_get(s.addr, "/readyz").await,
        (503, "not ready\n".into())
    );
    assert_eq!(
        http_get(op, "/readyz").await,
        (503, "storage writes failing\n".into())
    );
    store.set_failing(false);
    c.close_socket().await;
    s.stop().await;
}

/// A storage failure shorter than `readiness_outage_ms` leaves `/readyz` at 200 (every node shares
/// the database), while `hearth_dependency_up{dependency="storage"}` records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_storage_failure_keeps_the_node_ready() {
    let store = FlakyStore::new();
    let s = start_with(test_config(), store.clone(), |b| b).await;
    let op = s.operator_addr();
    let up = || {
        s.handle
            .metrics()
            .dependency_up
            .with_label_values(&["storage"])
            .get()
    };
    assert_eq!(up(), 1);
    let mut c = RawClient::connect(s.addr).await;
    c.join("blip").await;
    store.set_failing(true);
    c.send(update("blip", &YDoc::new(4).insert("unacked")))
        .await;
    wait_until(T, "the storage check fails", || up() == 0).await;
    assert_eq!(http_get(s.addr, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http_get(op, "/readyz").await, (200, "ready\n".into()));
    store.set_failing(false);
    wait_until(T, "the storage check recovers", || up() == 1).await;
    c.close_socket().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_listener_can_be_disabled() {
    let s = start(Config {
        operator_listen: String::new(),
        ..test_config()
    })
    .await;
    assert_eq!(s.operator, None);
    assert_eq!(http_get(s.addr, "/metrics").await.0, 404);
    assert_syncs(s.addr, "no-operator").await;
    s.stop().await;
}

#[test]
fn invalid_front_settings_name_the_setting() {
    let cases: [(&str, Config); 6] = [
        (
            "http_header_timeout_ms",
            Config {
                http_header_timeout_ms: 0,
                ..Config::for_tests()
            },
        ),
        (
            "max_connections",
            Config {
                max_connections: 0,
                ..Config::for_tests()
            },
        ),
        (
            "max_connections_per_ip",
            Config {
                max_connections_per_ip: 0,
                ..Config::for_tests()
            },
        ),
        (
            "trusted_proxies",
            Config {
                trusted_proxies: "10.0.0.0/40".into(),
                ..Config::for_tests()
            },
        ),
        (
            "trusted_proxies",
            Config {
                trusted_proxies: "proxy.internal".into(),
                ..Config::for_tests()
            },
        ),
        (
            "operator_listen",
            Config {
                operator_listen: "localhost".into(),
                ..Config::for_tests()
            },
        ),
    ];
    for (name, config) in cases {
        let err = config.validate().expect_err(name).to_string();
        assert!(err.contains(name), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
    assert!(Config::for_tests().validate().is_ok());
    assert_eq!(Config::default().auth_timeout_ms, 10_000);
    assert_eq!(Config::default().operator_listen, "127.0.0.1:9464");
}
