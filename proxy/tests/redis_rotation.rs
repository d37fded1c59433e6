//! Secret rotation between transports on a real `redis-server`: current and previous secrets
//! swapped still talk both ways; a transport with a secret neither knows is rejected, and every
//! rejection surfaces as `Inbound::Rejected { reason: BadMac }` for the caller to count.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::{RedisServer, connect, next, quiet};
use hearth_proxy::{
    Auth, Body, ConnId, Inbound, InboundReceiver, NodeAddr, NodeId, RejectReason, Secret, Secrets,
    Session, TransportConfig,
};

fn secret(s: &str) -> Secret {
    Secret::new(s).unwrap()
}

fn config(redis: &RedisServer, name: &str, secrets: &Secrets) -> TransportConfig {
    let me = NodeAddr::fresh(NodeId::new(name).unwrap());
    let mut config = TransportConfig::new(redis.url(), "hearth-rotation", me);
    config.auth = Auth::new(secrets);
    config
}

fn frame(data: &[u8]) -> Body {
    Body::Frame {
        session: Session {
            conn: ConnId::generate(),
            doc: "rotating".into(),
            epoch: 1,
        },
        data: data.to_vec(),
    }
}

/// The next event must be an envelope carrying `body`.
async fn expect_envelope(rx: &mut InboundReceiver, body: &Body) {
    match next(rx).await {
        Inbound::Envelope(env) => assert_eq!(&env.body, body),
        other => panic!("expected {body:?}, got {other:?}"),
    }
}

/// The next event must be a rejection; it is counted by reason.
async fn expect_rejected(rx: &mut InboundReceiver, counts: &mut HashMap<RejectReason, u32>) {
    match next(rx).await {
        Inbound::Rejected { reason, .. } => *counts.entry(reason).or_default() += 1,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn swapped_secrets_talk_and_an_unknown_secret_is_rejected() {
    let redis = RedisServer::start();
    let old = secret("Ho3Kx7Qm1Wr5Tz9Lb2Vn6Pc4Jd8Fg0Sa");
    let new = secret("Gm9Xq2Lr6Wk3Vz7Tb1Hn5Pc8Jd4Fs0Ye");
    let stranger = secret("Pq1Wm5Xz9Lr3Tk7Vb2Hn6Jc4Fd8Gs0Ea");
    // a node halfway through the rolling procedure, and one a step further
    let adding = Secrets::new(old.clone()).with_previous(new.clone());
    let swapped = Secrets::new(new.clone()).with_previous(old.clone());
    let (a, mut a_rx) = connect(config(&redis, "a", &adding)).await;
    let (b, mut b_rx) = connect(config(&redis, "b", &swapped)).await;
    let (c, mut c_rx) = connect(config(&redis, "c", &Secrets::new(stranger))).await;

    // a signs with `old`, which b accepts as its previous secret...
    let hello = frame(b"from a, signed with old");
    assert_eq!(a.send(b.me(), hello.clone()).await.unwrap(), 1);
    expect_envelope(&mut b_rx, &hello).await;
    // ...and b signs with `new`, which a accepts as its previous secret
    let back = Body::Out {
        session: Session {
            conn: ConnId::generate(),
            doc: "rotating".into(),
            epoch: 1,
        },
        data: b"from b, signed with new".to_vec(),
    };
    assert_eq!(b.send(a.me(), back.clone()).await.unwrap(), 1);
    expect_envelope(&mut a_rx, &back).await;
    // broadcasts too (a, b and c subscribe)
    let released = Body::Released {
        doc: "rotating".into(),
        epoch: 2,
    };
    assert_eq!(b.broadcast(released.clone()).await.unwrap(), 3);
    expect_envelope(&mut a_rx, &released).await;

    // c knows neither secret: whatever it sends is published, rejected and counted
    let mut counts = HashMap::new();
    for to in [a.me(), b.me()] {
        assert_eq!(c.send(to, frame(b"forged")).await.unwrap(), 1);
    }
    assert_eq!(
        c.broadcast(Body::Draining {
            node: a.me().clone()
        })
        .await
        .unwrap(),
        3
    );
    for rx in [&mut a_rx, &mut b_rx] {
        expect_rejected(rx, &mut counts).await; // the frame
        expect_rejected(rx, &mut counts).await; // the broadcast
    }
    // and c rejects what it hears from the others (b's broadcast above)
    expect_rejected(&mut c_rx, &mut counts).await;
    assert_eq!(counts, HashMap::from([(RejectReason::BadMac, 5)]));

    // the others keep talking after the forgeries
    let again = frame(b"still talking");
    assert_eq!(a.send(b.me(), again.clone()).await.unwrap(), 1);
    expect_envelope(&mut b_rx, &again).await;

    // the procedure's last step (only `new`) still reads b, and no longer reads a
    let (d, mut d_rx) = connect(config(&redis, "d", &Secrets::new(new))).await;
    let from_b = frame(b"b to d");
    assert_eq!(b.send(d.me(), from_b.clone()).await.unwrap(), 1);
    expect_envelope(&mut d_rx, &from_b).await;
    assert_eq!(a.send(d.me(), frame(b"a to d")).await.unwrap(), 1);
    let mut late = HashMap::new();
    expect_rejected(&mut d_rx, &mut late).await;
    assert_eq!(late, HashMap::from([(RejectReason::BadMac, 1)]));
    quiet(&mut a_rx).await;
    quiet(&mut b_rx).await;
}
