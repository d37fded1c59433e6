//! Frames larger than one envelope, between two transports on a real `redis-server`.

#![allow(clippy::unwrap_used)]

mod common;

use common::{RedisServer, connect, next, quiet};
use fred::prelude::{Builder, ClientLike, Config, PubsubInterface};
use hearth_proxy::{
    Auth, Body, Codec, ConnId, DropReason, Envelope, Header, Inbound, Kind, NodeAddr, NodeId,
    ProxyError, PubSubMode, ReassemblyLimits, RejectReason, Session, TransportConfig,
};

const SECRET: &[u8] = b"Rk5Wq1Xm9Lz3Tb7Vn2Hc8Pd4Jf6Gs0Ya";
/// The envelope cap of both transports in these tests.
const CAP: usize = 64 * 1024;

fn config(redis: &RedisServer, name: &str) -> TransportConfig {
    let me = NodeAddr::fresh(NodeId::new(name).unwrap());
    let mut config = TransportConfig::new(redis.url(), "hearth-test", me);
    config.auth = Auth::with_secret(SECRET).unwrap();
    config.max_envelope_bytes = CAP;
    config
}

fn frame(session: &Session, data: Vec<u8>) -> Body {
    Body::Frame {
        session: session.clone(),
        data,
    }
}

fn session(doc: &str) -> Session {
    Session {
        conn: ConnId::generate(),
        doc: doc.into(),
        epoch: 1,
    }
}

/// `len` bytes that differ at every offset modulo 251, so a misplaced part shows.
fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ salt)
        .collect::<Vec<u8>>()
}

async fn large_frames_cross_both_ways(mode: PubSubMode) {
    let redis = RedisServer::start();
    let mut co = config(&redis, "owner");
    co.pubsub = mode;
    let mut ce = config(&redis, "edge");
    ce.pubsub = mode;
    let (owner, mut owner_rx) = connect(co).await;
    let (edge, mut edge_rx) = connect(ce).await;
    let s = session("big");

    // owner → edge: a small frame, a frame of 50 envelopes' worth, another small one.
    let big = Body::Out {
        session: s.clone(),
        data: payload(50 * CAP + 123, 7),
    };
    let small = |n: u8| Body::Out {
        session: s.clone(),
        data: vec![n; 10],
    };
    let receipts = [
        owner.start_send(edge.me(), small(1)).unwrap(),
        owner.start_send(edge.me(), big.clone()).unwrap(),
        owner.start_send(edge.me(), small(2)).unwrap(),
    ];
    for r in receipts {
        assert_eq!(r.receivers().await.unwrap(), 1);
    }
    for want in [small(1), big, small(2)] {
        match next(&mut edge_rx).await {
            Inbound::Envelope(env) => {
                assert_eq!(&env.header.from, owner.me());
                assert!(env.body == want, "frame differs from what was sent");
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    // edge → owner: a `frame` in parts, then one that fits.
    let up = Body::Frame {
        session: s.clone(),
        data: payload(3 * CAP, 3),
    };
    assert_eq!(edge.send(owner.me(), up.clone()).await.unwrap(), 1);
    assert_eq!(
        edge.send(owner.me(), frame(&s, b"after".to_vec()))
            .await
            .unwrap(),
        1
    );
    for want in [up, frame(&s, b"after".to_vec())] {
        match next(&mut owner_rx).await {
            Inbound::Envelope(env) => assert!(env.body == want, "frame differs"),
            other => panic!("{other:?}"),
        }
    }
    quiet(&mut edge_rx).await;
    quiet(&mut owner_rx).await;
    assert_eq!(edge.partial_frames(), 0);
    assert_eq!(edge.partial_frame_bytes(), 0);
}

#[tokio::test]
async fn large_frames_cross_both_ways_signed() {
    large_frames_cross_both_ways(PubSubMode::Classic).await;
}

#[tokio::test]
async fn large_frames_cross_both_ways_sharded() {
    large_frames_cross_both_ways(PubSubMode::Sharded).await;
}

#[tokio::test]
async fn large_frames_of_two_senders_and_sessions_interleave() {
    let redis = RedisServer::start();
    let (a, _a_rx) = connect(config(&redis, "a")).await;
    let (b, _b_rx) = connect(config(&redis, "b")).await;
    let (edge, mut edge_rx) = connect(config(&redis, "edge")).await;
    let sessions: Vec<Session> = (0..4).map(|i| session(&format!("doc-{i}"))).collect();
    // Each sender queues a large and a small frame for each of two sessions, all at once.
    let mut receipts = Vec::new();
    let mut sent: Vec<(NodeAddr, Body)> = Vec::new();
    for (t, pair) in [(&a, &sessions[..2]), (&b, &sessions[2..])] {
        for (i, s) in pair.iter().enumerate() {
            for body in [
                Body::Out {
                    session: s.clone(),
                    data: payload((5 + i) * CAP, u8::try_from(i).unwrap()),
                },
                Body::Out {
                    session: s.clone(),
                    data: vec![9; 100],
                },
            ] {
                receipts.push(t.start_send(edge.me(), body.clone()).unwrap());
                sent.push((t.me().clone(), body));
            }
        }
    }
    for r in receipts {
        assert_eq!(r.receivers().await.unwrap(), 1);
    }
    let mut got: Vec<(NodeAddr, Body)> = Vec::new();
    while got.len() < sent.len() {
        match next(&mut edge_rx).await {
            Inbound::Envelope(env) => got.push((env.header.from, env.body)),
            other => panic!("{other:?}"),
        }
    }
    // Per sender, in the order sent; across senders, any interleaving.
    for who in [a.me(), b.me()] {
        let mine = |v: &[(NodeAddr, Body)]| -> Vec<Body> {
            v.iter()
                .filter(|(f, _)| f == who)
                .map(|(_, b)| b.clone())
                .collect()
        };
        assert!(mine(&got) == mine(&sent), "frames from {who} differ");
    }
    quiet(&mut edge_rx).await;
}

#[tokio::test]
async fn frames_beyond_the_limit_are_refused_by_the_sender() {
    let redis = RedisServer::start();
    let mut co = config(&redis, "owner");
    co.reassembly = ReassemblyLimits::new(4 * CAP);
    let (owner, _owner_rx) = connect(co).await;
    let (edge, mut edge_rx) = connect(config(&redis, "edge")).await;
    let s = session("d");
    let too_big = Body::Out {
        session: s.clone(),
        data: vec![0; 4 * CAP + 1],
    };
    match owner.start_send(edge.me(), too_big) {
        Err(ProxyError::FrameTooLarge { size, max }) => {
            assert_eq!((size, max), (4 * CAP + 1, 4 * CAP));
        }
        other => panic!("{other:?}"),
    }
    // Nothing went out, and the link's numbering has no hole.
    let ok = Body::Out {
        session: s,
        data: vec![1; 4 * CAP],
    };
    assert_eq!(owner.send(edge.me(), ok.clone()).await.unwrap(), 1);
    match next(&mut edge_rx).await {
        Inbound::Envelope(env) => assert!(env.body == ok),
        other => panic!("{other:?}"),
    }
    quiet(&mut edge_rx).await;
}

#[tokio::test]
async fn a_receiver_drops_and_reports_frames_beyond_its_limit() {
    let redis = RedisServer::start();
    let (owner, _owner_rx) = connect(config(&redis, "owner")).await;
    let mut ce = config(&redis, "edge");
    ce.reassembly = ReassemblyLimits::new(4 * CAP);
    let (edge, mut edge_rx) = connect(ce).await;
    let (s1, s2) = (session("one"), session("two"));
    let too_big = Body::Out {
        session: s1.clone(),
        data: payload(10 * CAP, 1),
    };
    let fits = Body::Out {
        session: s2.clone(),
        data: payload(3 * CAP, 2),
    };
    assert_eq!(owner.send(edge.me(), too_big).await.unwrap(), 1);
    assert_eq!(owner.send(edge.me(), fits.clone()).await.unwrap(), 1);
    match next(&mut edge_rx).await {
        Inbound::FrameDropped {
            from,
            session,
            reason,
        } => {
            assert_eq!(&from, owner.me());
            assert_eq!(session, s1);
            assert_eq!(reason, DropReason::TooLarge);
        }
        other => panic!("expected FrameDropped, got {other:?}"),
    }
    // The remaining parts of the dropped frame are reported too (same session), never
    // delivered; the next frame arrives intact.
    loop {
        match next(&mut edge_rx).await {
            Inbound::FrameDropped { session, .. } => assert_eq!(session, s1),
            Inbound::Envelope(env) => {
                assert!(env.body == fits, "frame differs");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    quiet(&mut edge_rx).await;
    assert_eq!(edge.partial_frames(), 0);
}

#[tokio::test]
async fn unsigned_parts_from_a_stranger_are_rejected() {
    let redis = RedisServer::start();
    let (edge, mut edge_rx) = connect(config(&redis, "edge")).await;
    let stranger = Builder::from_config(Config::from_url(&redis.url()).unwrap())
        .build()
        .unwrap();
    stranger.init().await.unwrap();
    let s = session("d");
    let codec = Codec::new(Auth::disabled(), CAP);
    let parts = hearth_proxy::split(&s, Kind::Out, &[1u8; 100], 60).unwrap();
    for (seq, body) in (1..).zip(parts) {
        let env = Envelope {
            header: Header {
                version: Kind::Part.since(),
                from: NodeAddr::fresh(NodeId::new("owner").unwrap()),
                to: Some(edge.me().clone()),
                seq,
            },
            body,
        };
        let bytes = codec.encode(&env).unwrap();
        let _: i64 = stranger
            .publish(edge.inbox_channel(), bytes::Bytes::from(bytes))
            .await
            .unwrap();
        match next(&mut edge_rx).await {
            Inbound::Rejected { reason, .. } => assert_eq!(reason, RejectReason::Unsigned),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(edge.partial_frames(), 0);
}
