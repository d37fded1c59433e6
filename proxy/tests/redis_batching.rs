//! Batching and per-node fan-out against a real `redis-server`: envelopes queued together for
//! one peer travel as one message, `out`s of the same frame for several clients of one node
//! travel once, every client still gets every frame in its own order, and a peer that never
//! said it reads batches only ever receives single envelopes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::{RedisServer, WAIT, connect, next, quiet};
use fred::prelude::{Builder, ClientLike, Config, EventInterface, PubsubInterface};
use hearth_proxy::{
    Auth, Body, Codec, ConnId, DEFAULT_MAX_ENVELOPE_BYTES, Inbound, Incarnation, Keys, NodeAddr,
    NodeId, Session, TransportConfig,
};

const SECRET: &[u8] = b"Rk5Wq1Xm9Lz3Tb7Vn2Hc8Pd4Jf6Gs0Ya";

fn config(redis: &RedisServer, name: &str) -> TransportConfig {
    let mut config = TransportConfig::new(
        redis.url(),
        "hearth-test",
        NodeAddr::fresh(NodeId::new(name).unwrap()),
    );
    config.auth = Auth::with_secret(SECRET).unwrap();
    config
}

fn session(conn: ConnId, doc: &str) -> Session {
    Session {
        conn,
        doc: doc.into(),
        epoch: 1,
    }
}

/// Every frame each connection received, in arrival order, from `Out` and `Fan` alike.
fn per_conn(received: &[Body]) -> HashMap<ConnId, Vec<Vec<u8>>> {
    let mut map: HashMap<ConnId, Vec<Vec<u8>>> = HashMap::new();
    for body in received {
        match body {
            Body::Out { session, data } => map.entry(session.conn).or_default().push(data.clone()),
            Body::Fan { conns, data, .. } => {
                for conn in conns {
                    map.entry(*conn).or_default().push(data.clone());
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    map
}

#[tokio::test]
async fn outs_for_one_node_are_batched_and_fanned_in_order() {
    let redis = RedisServer::start();
    let (owner, mut owner_rx) = connect(config(&redis, "owner")).await;
    let (edge, mut edge_rx) = connect(config(&redis, "edge")).await;
    // The edge speaks first (as an edge opens a session): the owner learns it reads batches.
    edge.send(owner.me(), Body::Keepalive { session: None })
        .await
        .unwrap();
    assert!(matches!(next(&mut owner_rx).await, Inbound::Envelope(_)));

    let conns: Vec<ConnId> = (0..4).map(|_| ConnId::generate()).collect();
    let mut expected: HashMap<ConnId, Vec<Vec<u8>>> = HashMap::new();
    let mut receipts = Vec::new();
    // 50 rounds: a broadcast to all four clients, then a reply for one of them.
    for round in 0..50u32 {
        let shared = format!("update {round}").into_bytes();
        for conn in &conns {
            receipts.push(
                owner
                    .start_send(
                        edge.me(),
                        Body::Out {
                            session: session(*conn, "doc"),
                            data: shared.clone(),
                        },
                    )
                    .unwrap(),
            );
            expected.entry(*conn).or_default().push(shared.clone());
        }
        let lone = conns[round as usize % conns.len()];
        let own = format!("ack {round}").into_bytes();
        receipts.push(
            owner
                .start_send(
                    edge.me(),
                    Body::Out {
                        session: session(lone, "doc"),
                        data: own.clone(),
                    },
                )
                .unwrap(),
        );
        expected.entry(lone).or_default().push(own);
    }
    for receipt in receipts {
        assert_eq!(receipt.receivers().await.unwrap(), 1);
    }
    let mut received = Vec::new();
    let mut last_seq = 0;
    let wanted: usize = expected.values().map(Vec::len).sum();
    while per_conn(&received).values().map(Vec::len).sum::<usize>() < wanted {
        match next(&mut edge_rx).await {
            Inbound::Envelope(env) => {
                assert_eq!(env.header.seq, last_seq + 1, "numbered without gaps");
                last_seq = env.header.seq;
                received.push(env.body);
            }
            other => panic!("{other:?}"),
        }
    }
    quiet(&mut edge_rx).await;
    assert_eq!(
        per_conn(&received),
        expected,
        "every client, every frame, in order"
    );
    let stats = owner.stats();
    assert!(
        received.iter().any(|b| matches!(b, Body::Fan { .. })),
        "no fan at all"
    );
    assert!(stats.fanned > 0, "{stats:?}");
    assert!(stats.batches > 0, "{stats:?}");
    assert!(
        stats.messages < stats.envelopes,
        "batches carry several envelopes: {stats:?}"
    );
    assert_eq!(stats.envelopes, last_seq, "{stats:?}");
}

#[tokio::test]
async fn batching_off_sends_single_envelopes() {
    let redis = RedisServer::start();
    let mut c = config(&redis, "owner");
    c.batching = false;
    let (owner, mut owner_rx) = connect(c).await;
    let (edge, mut edge_rx) = connect(config(&redis, "edge")).await;
    edge.send(owner.me(), Body::Keepalive { session: None })
        .await
        .unwrap();
    next(&mut owner_rx).await;
    let conn = ConnId::generate();
    let receipts: Vec<_> = (0..100u8)
        .map(|i| {
            owner
                .start_send(
                    edge.me(),
                    Body::Out {
                        session: session(conn, "doc"),
                        data: vec![i],
                    },
                )
                .unwrap()
        })
        .collect();
    for r in receipts {
        r.receivers().await.unwrap();
    }
    for i in 0..100u8 {
        match next(&mut edge_rx).await {
            Inbound::Envelope(env) => assert_eq!(
                env.body,
                Body::Out {
                    session: session(conn, "doc"),
                    data: vec![i]
                }
            ),
            other => panic!("{other:?}"),
        }
    }
    let stats = owner.stats();
    assert_eq!(stats.batches, 0);
    assert_eq!(stats.messages, 100);
}

/// A peer of schema version 2 (it sends no `mv`) is never sent a batch or a `fan`: every
/// message on its inbox decodes as one envelope of a kind it knows.
#[tokio::test]
async fn a_version_2_peer_gets_single_envelopes_only() {
    let redis = RedisServer::start();
    let (owner, mut owner_rx) = connect(config(&redis, "owner")).await;
    let old = NodeAddr::new(NodeId::new("old").unwrap(), Incarnation(77));
    let keys = Keys::new("hearth-test").unwrap();
    let codec = Codec::new(
        Auth::with_secret(SECRET).unwrap(),
        DEFAULT_MAX_ENVELOPE_BYTES,
    );

    // the old node's inbox, watched raw
    let mut builder = Builder::from_config(Config::from_url(&redis.url()).unwrap());
    builder.with_performance_config(|p| p.broadcast_channel_capacity = 4096);
    let sub = builder.build_subscriber_client().unwrap();
    sub.init().await.unwrap();
    let mut messages = sub.message_rx();
    sub.subscribe(keys.inbox(&old)).await.unwrap();

    // what a version-2 node sends: a keepalive without `mv`
    let publisher = Builder::from_config(Config::from_url(&redis.url()).unwrap())
        .build()
        .unwrap();
    publisher.init().await.unwrap();
    let bytes = {
        #[derive(serde::Serialize)]
        struct V2Keepalive<'a> {
            v: u8,
            t: &'a str,
            from: &'a NodeAddr,
            to: &'a NodeAddr,
            seq: u64,
            b: std::collections::BTreeMap<String, u8>,
        }
        let mut body = Vec::new();
        serde::Serialize::serialize(
            &V2Keepalive {
                v: 1,
                t: "keepalive",
                from: &old,
                to: owner.me(),
                seq: 1,
                b: Default::default(),
            },
            &mut rmp_serde::Serializer::new(&mut body).with_struct_map(),
        )
        .unwrap();
        codec_wrap(&body)
    };
    let _: i64 = publisher
        .publish(keys.inbox(owner.me()), bytes)
        .await
        .unwrap();
    assert!(matches!(next(&mut owner_rx).await, Inbound::Envelope(_)));

    let conns: Vec<ConnId> = (0..3).map(|_| ConnId::generate()).collect();
    let receipts: Vec<_> = (0..30u8)
        .flat_map(|i| {
            conns
                .iter()
                .map(|c| {
                    owner
                        .start_send(
                            &old,
                            Body::Out {
                                session: session(*c, "doc"),
                                data: vec![i],
                            },
                        )
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for r in receipts {
        r.receivers().await.unwrap();
    }
    for n in 1..=90u64 {
        let message = tokio::time::timeout(WAIT, messages.recv())
            .await
            .unwrap()
            .unwrap();
        let env = codec.decode(message.value.as_bytes().unwrap()).unwrap();
        assert_eq!(env.header.seq, n);
        assert_eq!(env.header.version, 1);
        assert!(matches!(env.body, Body::Out { .. }));
    }
    assert_eq!(owner.stats().batches, 0);
}

/// Signs a raw msgpack body the way a node with [`SECRET`] does.
fn codec_wrap(body: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, KeyInit, Mac};
    let mut out = vec![0x02, 0x00];
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(&out);
    mac.update(body);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out.extend_from_slice(body);
    out
}
