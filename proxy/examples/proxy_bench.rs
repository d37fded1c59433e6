//! Measures envelope encode/decode (+HMAC) cost and publish→receive latency over a local Redis.
//!
//! ```text
//! cargo run --release -p hearth-proxy --example proxy_bench
//! ```
//!
//! Starts its own `redis-server` on a free port (same harness as the integration tests).

#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proxy::{
    Auth, Body, Codec, ConnId, DEFAULT_MAX_ENVELOPE_BYTES, Envelope, Header, Inbound, Incarnation,
    NodeAddr, NodeId, Rpc, SCHEMA_VERSION, Session, Transport, TransportConfig,
};

const SECRET: &[u8] = b"Bq4Xn8Rm2Lv6Tk1Wz9Hc5Pd3Jf7Gs0Ya";

fn envelope(payload: usize) -> Envelope {
    Envelope {
        header: Header {
            version: SCHEMA_VERSION,
            from: NodeAddr::new(NodeId::new("node-a").unwrap(), Incarnation::random()),
            to: Some(NodeAddr::new(
                NodeId::new("node-b").unwrap(),
                Incarnation::random(),
            )),
            seq: 123_456,
        },
        body: Body::Frame {
            session: Session {
                conn: ConnId::generate(),
                doc: "workspace-42/notes/2026-11-22".into(),
                epoch: 17,
            },
            data: vec![0xa5; payload],
        },
    }
}

fn codec_costs() {
    println!("## codec (ns per envelope, single thread)");
    println!(
        "| payload | wire bytes | encode plain | decode plain | encode+HMAC | verify+decode |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for payload in [64usize, 1024, 16 * 1024, 256 * 1024] {
        let iterations = (20_000_000 / (payload + 200)).clamp(200, 200_000);
        let env = envelope(payload);
        let plain = Codec::new(Auth::disabled(), DEFAULT_MAX_ENVELOPE_BYTES);
        let signed = Codec::new(
            Auth::with_secret(SECRET).unwrap(),
            DEFAULT_MAX_ENVELOPE_BYTES,
        );
        let mut row = Vec::new();
        let mut wire = 0;
        for codec in [&plain, &signed] {
            let bytes = codec.encode(&env).unwrap();
            wire = bytes.len();
            let start = Instant::now();
            for _ in 0..iterations {
                black_box(codec.encode(black_box(&env)).unwrap());
            }
            row.push(start.elapsed().as_nanos() as f64 / iterations as f64);
            let start = Instant::now();
            for _ in 0..iterations {
                black_box(codec.decode(black_box(&bytes)).unwrap());
            }
            row.push(start.elapsed().as_nanos() as f64 / iterations as f64);
        }
        println!(
            "| {payload} | {wire} | {:.0} | {:.0} | {:.0} | {:.0} |",
            row[0], row[1], row[2], row[3]
        );
    }
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

async fn latency(redis_url: &str) {
    let mut ca = TransportConfig::new(
        redis_url,
        "bench",
        NodeAddr::fresh(NodeId::new("a").unwrap()),
    );
    ca.auth = Auth::with_secret(SECRET).unwrap();
    let mut cb = TransportConfig::new(
        redis_url,
        "bench",
        NodeAddr::fresh(NodeId::new("b").unwrap()),
    );
    cb.auth = Auth::with_secret(SECRET).unwrap();
    let (a, mut a_rx) = Transport::connect(ca).await.unwrap();
    let (b, mut b_rx) = Transport::connect(cb).await.unwrap();
    let session = Session {
        conn: ConnId::generate(),
        doc: "doc".into(),
        epoch: 1,
    };

    println!();
    println!("## publish → receive, one in flight, HMAC on (µs)");
    println!("| case | n | p50 | p90 | p99 | p99.9 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for payload in [64usize, 1024, 64 * 1024] {
        let n = if payload > 4096 { 2_000 } else { 10_000 };
        let mut samples = Vec::with_capacity(n);
        for i in 0..(n + 200) {
            let body = Body::Frame {
                session: session.clone(),
                data: vec![7; payload],
            };
            let start = Instant::now();
            let receipt = a.start_send(b.me(), body).unwrap();
            match b_rx.recv().await {
                Some(Inbound::Envelope(_)) => {}
                other => panic!("{other:?}"),
            }
            let elapsed = start.elapsed();
            assert_eq!(receipt.receivers().await.unwrap(), 1);
            if i >= 200 {
                samples.push(elapsed);
            }
        }
        percentiles(&format!("frame {payload} B one-way"), samples);
    }

    // RPC round trip: b echoes.
    let server = {
        let rpc = Rpc::new(b.clone());
        tokio::spawn(async move {
            while let Some(event) = b_rx.recv().await {
                if let Inbound::Envelope(Envelope {
                    header,
                    body: Body::Rpc(req),
                }) = event
                {
                    let payload = req.payload.clone();
                    rpc.reply(&header.from, &req, Ok(payload)).await.unwrap();
                }
            }
        })
    };
    let rpc = Arc::new(Rpc::new(a.clone()));
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
    let mut samples = Vec::new();
    for i in 0..5_200 {
        let start = Instant::now();
        rpc.call(b.me(), "doc", "echo", vec![1; 64], Duration::from_secs(5))
            .await
            .unwrap();
        if i >= 200 {
            samples.push(start.elapsed());
        }
    }
    percentiles("rpc 64 B round trip", samples);
    server.abort();
    dispatcher.abort();

    // Throughput: a burst of pipelined sends.
    let (c, mut c_rx) = {
        let mut cc = TransportConfig::new(
            redis_url,
            "bench",
            NodeAddr::fresh(NodeId::new("c").unwrap()),
        );
        cc.auth = Auth::with_secret(SECRET).unwrap();
        Transport::connect(cc).await.unwrap()
    };
    let total = 20_000;
    let start = Instant::now();
    let mut receipts = Vec::with_capacity(total);
    let mut received = 0;
    for _ in 0..total {
        let body = Body::Frame {
            session: session.clone(),
            data: vec![7; 256],
        };
        loop {
            match a.start_send(c.me(), body.clone()) {
                Ok(r) => {
                    receipts.push(r);
                    break;
                }
                Err(hearth_proxy::ProxyError::Clogged) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    }
    let mut gaps = 0;
    while received < total {
        match tokio::time::timeout(Duration::from_secs(5), c_rx.recv()).await {
            Ok(Some(Inbound::Envelope(_))) => received += 1,
            Ok(Some(Inbound::Gap { .. } | Inbound::Lagged { .. })) => gaps += 1,
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    for r in receipts {
        r.receivers().await.unwrap();
    }
    println!();
    println!(
        "burst: {received}/{total} envelopes of 256 B (signed) received in {:.1} ms = {:.0} envelopes/s, {gaps} gap events",
        elapsed.as_secs_f64() * 1e3,
        received as f64 / elapsed.as_secs_f64()
    );
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

fn main() {
    codec_costs();
    let redis = common::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(latency(&redis.url()));
}
