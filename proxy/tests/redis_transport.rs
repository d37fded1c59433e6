//! Integration tests against a real `redis-server` started by each test.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, WAIT, connect, next, quiet};
use fred::prelude::{Builder, Client, ClientLike, Config, PubsubInterface};
use fred::types::CustomCommand;
use hearth_proxy::{
    Auth, Body, Codec, ConnId, DEFAULT_MAX_ENVELOPE_BYTES, Envelope, Header, Inbound, Incarnation,
    NodeAddr, NodeId, PubSubMode, RejectReason, Rpc, RpcError, RpcErrorCode, RpcFailure,
    SCHEMA_VERSION, Session, Transport, TransportConfig,
};

const SECRET: &[u8] = b"Rk5Wq1Xm9Lz3Tb7Vn2Hc8Pd4Jf6Gs0Ya";

fn node(name: &str) -> NodeAddr {
    NodeAddr::fresh(NodeId::new(name).unwrap())
}

fn config(redis: &RedisServer, name: &str, secret: Option<&[u8]>) -> TransportConfig {
    let mut config = TransportConfig::new(redis.url(), "hearth-test", node(name));
    if let Some(secret) = secret {
        config.auth = Auth::with_secret(secret).unwrap();
    }
    config
}

fn session(doc: &str) -> Session {
    Session {
        conn: ConnId::generate(),
        doc: doc.into(),
        epoch: 1,
    }
}

fn frame(session: &Session, data: Vec<u8>) -> Body {
    Body::Frame {
        session: session.clone(),
        data,
    }
}

async fn admin(redis: &RedisServer) -> Client {
    let client = Builder::from_config(Config::from_url(&redis.url()).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

async fn exchange_in_order(mode: PubSubMode, secret: Option<&[u8]>) {
    let redis = RedisServer::start();
    let mut ca = config(&redis, "a", secret);
    ca.pubsub = mode;
    let mut cb = config(&redis, "b", secret);
    cb.pubsub = mode;
    let (a, mut a_rx) = connect(ca).await;
    let (b, mut b_rx) = connect(cb).await;
    let s = session("doc-1");

    const N: u64 = 500;
    // Queue everything first (pipelined), then collect receiver counts.
    let receipts: Vec<_> = (1..=N)
        .map(|i| {
            a.start_send(b.me(), frame(&s, i.to_be_bytes().to_vec()))
                .unwrap()
        })
        .collect();
    for receipt in receipts {
        assert_eq!(receipt.receivers().await.unwrap(), 1);
    }
    for i in 1..=N {
        match next(&mut b_rx).await {
            Inbound::Envelope(env) => {
                assert_eq!(env.header.seq, i);
                assert_eq!(&env.header.from, a.me());
                assert_eq!(env.header.to.as_ref(), Some(b.me()));
                assert_eq!(env.body, frame(&s, i.to_be_bytes().to_vec()));
            }
            other => panic!("expected envelope {i}, got {other:?}"),
        }
    }
    // And back: an `out` frame on the b → a link, which has its own numbering.
    let out = Body::Out {
        session: s.clone(),
        data: b"hello".to_vec(),
    };
    assert_eq!(b.send(a.me(), out.clone()).await.unwrap(), 1);
    match next(&mut a_rx).await {
        Inbound::Envelope(env) => {
            assert_eq!(env.header.seq, 1);
            assert_eq!(env.body, out);
        }
        other => panic!("{other:?}"),
    }
    quiet(&mut b_rx).await;
    assert_eq!(a.outbound_links(), 1);
    assert_eq!(b.inbound_links(), 1);
}

#[tokio::test]
async fn two_transports_exchange_in_order_signed() {
    exchange_in_order(PubSubMode::Classic, Some(SECRET)).await;
}

#[tokio::test]
async fn two_transports_exchange_in_order_sharded_unsigned() {
    exchange_in_order(PubSubMode::Sharded, None).await;
}

#[tokio::test]
async fn broadcast_reaches_peers_but_not_self() {
    let redis = RedisServer::start();
    let (a, mut a_rx) = connect(config(&redis, "a", Some(SECRET))).await;
    let (b, mut b_rx) = connect(config(&redis, "b", Some(SECRET))).await;
    let body = Body::Released {
        doc: "doc".into(),
        epoch: 3,
    };
    // Two subscribers on the broadcast channel: a and b.
    assert_eq!(a.broadcast(body.clone()).await.unwrap(), 2);
    match next(&mut b_rx).await {
        Inbound::Envelope(env) => {
            assert_eq!(env.body, body);
            assert_eq!(env.header.to, None);
        }
        other => panic!("{other:?}"),
    }
    quiet(&mut a_rx).await;
    drop(b);
}

#[tokio::test]
async fn stranger_cannot_inject_when_a_secret_is_configured() {
    let redis = RedisServer::start();
    let (a, _a_rx) = connect(config(&redis, "a", Some(SECRET))).await;
    let (b, mut b_rx) = connect(config(&redis, "b", Some(SECRET))).await;
    let stranger = admin(&redis).await;
    let inbox = b.inbox_channel().to_owned();

    let env = |to: &NodeAddr, seq| Envelope {
        header: Header {
            version: SCHEMA_VERSION,
            from: a.me().clone(), // impersonates a
            to: Some(to.clone()),
            seq,
        },
        body: frame(&session("doc"), b"evil".to_vec()),
    };
    let unsigned = Codec::new(Auth::disabled(), DEFAULT_MAX_ENVELOPE_BYTES)
        .encode(&env(b.me(), 1))
        .unwrap();
    let wrong_key = Codec::new(
        Auth::with_secret(b"Zm8Lq3Xr7Wk1Vb5Tn9Hc2Pd6Jf4Gs0Ya").unwrap(),
        DEFAULT_MAX_ENVELOPE_BYTES,
    )
    .encode(&env(b.me(), 1))
    .unwrap();
    let mut tampered = Codec::new(
        Auth::with_secret(SECRET).unwrap(),
        DEFAULT_MAX_ENVELOPE_BYTES,
    )
    .encode(&env(b.me(), 1))
    .unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let cases: Vec<(Vec<u8>, RejectReason)> = vec![
        (b"raw garbage".to_vec(), RejectReason::UnknownFormat),
        (vec![0x01, 0x80], RejectReason::Unsigned),
        (unsigned, RejectReason::Unsigned),
        (wrong_key, RejectReason::BadMac),
        (tampered, RejectReason::BadMac),
    ];
    for (bytes, reason) in cases {
        let receivers: i64 = stranger
            .publish(inbox.as_str(), bytes::Bytes::from(bytes))
            .await
            .unwrap();
        assert_eq!(receivers, 1);
        match next(&mut b_rx).await {
            Inbound::Rejected { reason: got, .. } => assert_eq!(got, reason),
            other => panic!("expected rejection {reason:?}, got {other:?}"),
        }
    }
    // A correctly signed envelope for b's previous incarnation (a replay across restarts).
    let old_me = NodeAddr::new(b.me().id.clone(), Incarnation(b.me().inc.0 ^ 1));
    let replay = Codec::new(
        Auth::with_secret(SECRET).unwrap(),
        DEFAULT_MAX_ENVELOPE_BYTES,
    )
    .encode(&env(&old_me, 1))
    .unwrap();
    let _: i64 = stranger
        .publish(inbox.as_str(), bytes::Bytes::from(replay))
        .await
        .unwrap();
    match next(&mut b_rx).await {
        Inbound::Rejected { reason, .. } => assert_eq!(reason, RejectReason::WrongDestination),
        other => panic!("{other:?}"),
    }
    // None of that touched the a → b link: a's first real envelope is number 1, no gap.
    let s = session("doc");
    a.send(b.me(), frame(&s, b"good".to_vec())).await.unwrap();
    match next(&mut b_rx).await {
        Inbound::Envelope(env) => {
            assert_eq!(env.header.seq, 1);
            assert_eq!(env.body, frame(&s, b"good".to_vec()));
        }
        other => panic!("{other:?}"),
    }
    quiet(&mut b_rx).await;
}

#[tokio::test]
async fn send_to_a_dead_incarnation_reaches_nobody() {
    let redis = RedisServer::start();
    let (a, _a_rx) = connect(config(&redis, "a", Some(SECRET))).await;
    let (b, mut b_rx) = connect(config(&redis, "b", Some(SECRET))).await;
    let s = session("doc");
    // Same node name, another incarnation: nobody listens.
    let ghost = NodeAddr::new(b.me().id.clone(), Incarnation::random());
    assert_eq!(a.send(&ghost, frame(&s, vec![1])).await.unwrap(), 0);
    assert_eq!(a.send(b.me(), frame(&s, vec![2])).await.unwrap(), 1);
    assert!(matches!(next(&mut b_rx).await, Inbound::Envelope(_)));

    // After b shuts down, its inbox has no subscriber.
    let b_addr = b.me().clone();
    b.shutdown().await;
    let mut receivers = 1;
    for _ in 0..50 {
        receivers = a.send(&b_addr, frame(&s, vec![3])).await.unwrap();
        if receivers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receivers, 0);
    // The inbound channel of a shut-down transport ends.
    let end = tokio::time::timeout(WAIT, async { while b_rx.recv().await.is_some() {} }).await;
    assert!(end.is_ok(), "inbound channel did not close");
}

#[tokio::test]
async fn killed_subscriber_resubscribes_reports_and_resumes() {
    let redis = RedisServer::start();
    let mut cb = config(&redis, "b", Some(SECRET));
    cb.reconnect_min = Duration::from_millis(20);
    cb.reconnect_max = Duration::from_millis(200);
    let (a, _a_rx) = connect(config(&redis, "a", Some(SECRET))).await;
    let (b, mut b_rx) = connect(cb).await;
    let admin = admin(&redis).await;
    let s = session("doc");

    assert_eq!(a.send(b.me(), frame(&s, vec![1])).await.unwrap(), 1);
    assert!(matches!(next(&mut b_rx).await, Inbound::Envelope(_)));

    let killed: i64 = admin
        .custom(
            CustomCommand::new_static("CLIENT", None::<u16>, false),
            vec!["KILL", "TYPE", "pubsub"],
        )
        .await
        .unwrap();
    assert!(killed >= 2, "killed {killed} pubsub connections");
    // Published while b's subscriber is down: nobody receives it.
    let lost = a.send(b.me(), frame(&s, vec![2])).await.unwrap();

    // Delivery resumes once b has re-subscribed.
    let mut reachable = false;
    for _ in 0..100 {
        if a.send(b.me(), frame(&s, vec![3])).await.unwrap() == 1 {
            reachable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reachable, "b never became reachable again");

    // Collect b's events until the envelope carrying [3] arrives.
    let mut events = Vec::new();
    loop {
        let event = next(&mut b_rx).await;
        let done = matches!(&event, Inbound::Envelope(env) if env.body == frame(&s, vec![3]));
        events.push(event);
        if done {
            break;
        }
    }
    assert!(
        events.iter().any(|e| matches!(e, Inbound::Resubscribed)),
        "no Resubscribed event: {events:?}"
    );
    // Every number from 2 on is accounted for: delivered in order, or covered by a gap report.
    let mut expected = 2;
    let mut gaps = 0;
    for event in &events {
        match event {
            Inbound::Gap {
                from,
                broadcast: false,
                expected: e,
                got,
            } => {
                assert_eq!(from, a.me());
                assert_eq!(*e, expected, "{events:?}");
                expected = *got;
                gaps += 1;
            }
            Inbound::Envelope(env) => {
                assert_eq!(env.header.seq, expected, "{events:?}");
                expected += 1;
            }
            Inbound::Resubscribed => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    if lost == 0 {
        assert!(
            gaps > 0,
            "envelope 2 was lost but no gap was reported: {events:?}"
        );
    }
}

#[tokio::test]
async fn lagging_receiver_surfaces_as_an_event() {
    let redis = RedisServer::start();
    let mut cb = config(&redis, "b", None);
    cb.broadcast_channel_capacity = 16;
    cb.inbound_capacity = 1;
    let (a, _a_rx) = connect(config(&redis, "a", None)).await;
    let (b, mut b_rx) = connect(cb).await;
    let s = session("doc");
    let receipts: Vec<_> = (0..400u32)
        .map(|i| {
            a.start_send(b.me(), frame(&s, i.to_be_bytes().to_vec()))
                .unwrap()
        })
        .collect();
    for receipt in receipts {
        assert_eq!(receipt.receivers().await.unwrap(), 1);
    }
    let mut lagged = 0;
    let mut gaps = 0;
    let mut delivered = 0;
    // Drain until quiet.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), b_rx.recv()).await
    {
        match event {
            Inbound::Lagged { missed } => lagged += missed,
            Inbound::Gap { .. } => gaps += 1,
            Inbound::Envelope(_) => delivered += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(lagged > 0, "no Lagged event (delivered {delivered})");
    assert!(gaps > 0, "lost envelopes were not reported as a gap");
    assert_eq!(
        delivered + lagged,
        400,
        "every envelope is delivered or counted as lost"
    );
}

/// Runs a custom-event handler on `rx` for `b`: `echo` reverses the payload, `fail` fails,
/// `slow` never answers.
fn serve_events(
    b: Transport,
    mut rx: hearth_proxy::InboundReceiver,
) -> tokio::task::JoinHandle<()> {
    let rpc = Rpc::new(b);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let Inbound::Envelope(env) = event else {
                continue;
            };
            let Body::Rpc(req) = env.body else { continue };
            let result = match req.name.as_str() {
                "echo" => Ok(req.payload.iter().rev().copied().collect()),
                "fail" => Err(RpcFailure {
                    code: RpcErrorCode::HandlerError,
                    msg: "handler exploded".into(),
                    holder: None,
                }),
                _ => continue,
            };
            rpc.reply(&env.header.from, &req, result).await.unwrap();
        }
    })
}

#[tokio::test]
async fn rpc_round_trip_error_timeout_and_unreachable() {
    let redis = RedisServer::start();
    let (a, mut a_rx) = connect(config(&redis, "a", Some(SECRET))).await;
    let (b, b_rx) = connect(config(&redis, "b", Some(SECRET))).await;
    let b_addr = b.me().clone();
    let server = serve_events(b, b_rx);

    let rpc = Arc::new(Rpc::new(a));
    let dispatcher = {
        let rpc = rpc.clone();
        tokio::spawn(async move {
            while let Some(event) = a_rx.recv().await {
                if let Inbound::Envelope(Envelope {
                    body: Body::RpcReply(reply),
                    ..
                }) = event
                {
                    rpc.on_reply(reply);
                }
            }
        })
    };

    let out = rpc
        .call(&b_addr, "doc", "echo", b"abc".to_vec(), WAIT)
        .await
        .unwrap();
    assert_eq!(out, b"cba");

    match rpc.call(&b_addr, "doc", "fail", vec![], WAIT).await {
        Err(RpcError::Remote { code, msg }) => {
            assert_eq!(code, RpcErrorCode::HandlerError);
            assert_eq!(msg, "handler exploded");
        }
        other => panic!("{other:?}"),
    }

    let started = tokio::time::Instant::now();
    let slow = rpc
        .call(&b_addr, "doc", "slow", vec![], Duration::from_millis(300))
        .await;
    assert!(matches!(slow, Err(RpcError::Timeout)), "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let ghost = NodeAddr::new(b_addr.id.clone(), Incarnation::random());
    let gone = rpc.call(&ghost, "doc", "echo", vec![], WAIT).await;
    assert!(matches!(gone, Err(RpcError::Unreachable)), "{gone:?}");

    // Many concurrent calls, then nothing left pending.
    let calls: Vec<_> = (0..50u8)
        .map(|i| {
            let rpc = rpc.clone();
            let to = b_addr.clone();
            tokio::spawn(async move { rpc.call(&to, "doc", "echo", vec![i, 0], WAIT).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), vec![0, i as u8]);
    }
    assert_eq!(rpc.pending_len(), 0);
    server.abort();
    dispatcher.abort();
}
