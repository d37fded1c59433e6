//! Envelopes published by a stranger on the cluster's Redis channels have no effect: every node
//! runs with `HEARTH_CLUSTER_SECRET` (docs/cluster.md, "The cluster secret" and the guarantees
//! table, "a stranger publishes on the channels"; envelope wire format in "Envelope schema").
//!
//! Three nodes sharing a secret; `guarded` is owned by n1, watched by a client on n1 and one on
//! n2. The stranger ("mallory", a made-up node with its own incarnation) publishes on n1's inbox
//! channel `<prefix>:inbox:n1:<incarnation>` attacks that would each add a marker to `guarded` if
//! accepted: `open` a session, forward an `Auth` frame, forward a Yjs update. Every attack is
//! published as
//!
//! * raw bytes (an unknown format tag; a truncated signed envelope),
//! * unsigned envelopes (`0x01 | body`),
//! * envelopes signed with a wrong (but strong) secret, correctly signed ones with the key id
//!   changed to a reserved one, and correctly signed ones tampered with after signing (the last
//!   byte of the body changed),
//!
//! plus unsigned and wrongly signed `draining` broadcasts on `<prefix>:bcast`. Every publish must
//! reach its subscribers (`PUBLISH` counts them), each node must count exactly what it received
//! in `hearth_cluster_envelopes_rejected_total{reason}`, and the document must stay as it was:
//! for both watchers, for a fresh client, and in the database.
//!
//! Replay: an eavesdropper subscribed to n1's inbox captures the signed envelopes n2 sends for
//! the watcher it proxies (its `open`, frames, keepalives) and publishes them again; n1 drops them
//! all as duplicates or late (`reason="out_of_order"`) and the watcher's attachment keeps working.
//!
//! Control: the same attack signed with the cluster's secret *is* accepted (its marker reaches
//! the watchers), which shows the forged envelopes were well-formed and only their signature
//! kept them out.

use std::collections::BTreeMap;

use cluster_tests::testbed::client::auth_frame;
use cluster_tests::testbed::raw::{marker_update, update};
use cluster_tests::testbed::redis::Resp;
use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, WAIT, marker_hits, random_secret,
    wait_until,
};
use hearth_proxy::{
    Auth, Body, Codec, ConnId, DEFAULT_MAX_ENVELOPE_BYTES, Envelope, Header, Incarnation, Keys,
    NodeAddr, NodeId, OpenMeta, SCHEMA_VERSION, Session,
};

const DOC: &str = "guarded";
const REJECTED: &str = "hearth_cluster_envelopes_rejected_total";

/// The three envelopes of one attack (open, Auth frame, update frame adding `marker`) from a
/// fresh stranger incarnation to `to`, encoded with `codec`.
fn attack(codec: &Codec, to: &NodeAddr, marker: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let from = NodeAddr::fresh(NodeId::new("mallory")?);
    let session = Session {
        conn: ConnId::generate(),
        doc: DOC.into(),
        epoch: 0,
    };
    let bodies = [
        Body::Open {
            session: session.clone(),
            meta: OpenMeta {
                path: "/".into(),
                ..OpenMeta::default()
            },
        },
        Body::Frame {
            session: session.clone(),
            data: auth_frame(DOC, "", Some("4.8.0")).to_vec(),
        },
        Body::Frame {
            session,
            data: update(DOC, &marker_update(0x6d61_6c6c, marker)).to_vec(),
        },
    ];
    let mut out = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let env = Envelope {
            header: Header {
                version: SCHEMA_VERSION,
                from: from.clone(),
                to: Some(to.clone()),
                seq: i as u64 + 1,
            },
            body,
        };
        out.push(codec.encode(&env)?);
    }
    Ok(out)
}

/// A `draining` broadcast for `node` (it would make every node forget routes to it).
fn forged_draining(codec: &Codec, node: &NodeAddr) -> anyhow::Result<Vec<u8>> {
    let env = Envelope {
        header: Header {
            version: SCHEMA_VERSION,
            from: NodeAddr::fresh(NodeId::new("mallory")?),
            to: None,
            seq: 1,
        },
        body: Body::Draining { node: node.clone() },
    };
    Ok(codec.encode(&env)?)
}

fn codec(auth: Auth) -> Codec {
    Codec::new(auth, DEFAULT_MAX_ENVELOPE_BYTES)
}

async fn publish(cluster: &Cluster, channel: &str, payload: &[u8]) -> anyhow::Result<i64> {
    match cluster
        .redis()
        .command_bytes(&[b"PUBLISH", channel.as_bytes(), payload])
        .await?
    {
        Resp::Int(n) => Ok(n),
        other => anyhow::bail!("PUBLISH answered {other:?}"),
    }
}

/// `hearth_cluster_envelopes_rejected_total` of every node, by reason (zero series omitted).
async fn rejected(cluster: &Cluster) -> anyhow::Result<Vec<BTreeMap<String, u64>>> {
    let reasons = [
        "oversize",
        "malformed",
        "unknown_format",
        "unsigned",
        "unknown_key",
        "bad_mac",
        "unsupported_version",
        "unknown_kind",
        "wrong_destination",
    ];
    let mut out = Vec::new();
    for i in 0..cluster.nodes.len() {
        let m = cluster.metrics(i).await?;
        let mut by = BTreeMap::new();
        for r in reasons {
            let v = m.sum(REJECTED, &[("reason", r)]) as u64;
            if v > 0 {
                by.insert(r.to_string(), v);
            }
        }
        out.push(by);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stranger_envelopes_are_rejected_and_counted() -> anyhow::Result<()> {
    let test = "cluster_envelope_auth";
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(3);
    let cluster = Cluster::start(&scratch, spec).await?;
    let secret = cluster.secret().as_bytes().to_vec();

    let keys = Keys::new(cluster.prefix())?;
    let inc = cluster.incarnation("n1").await?.expect("n1 is alive");
    let n1 = NodeAddr::new(
        NodeId::new("n1")?,
        Incarnation(u64::from_str_radix(&inc, 16)?),
    );
    let inbox = keys.inbox(&n1);
    // an eavesdropper on n1's inbox (anyone with Redis access can read), from before w2 attaches
    let tap = cluster.redis().subscribe(&inbox).await?;
    let w1 = TestClient::connect_with(&cluster.nodes[0].url(), DOC, ClientOptions::labelled("w1"))
        .await?;
    let w2 = TestClient::connect_with(&cluster.nodes[1].url(), DOC, ClientOptions::labelled("w2"))
        .await?;
    for _ in 0..3 {
        w1.insert_next();
    }
    w1.wait_all_acked(WAIT).await?;
    w2.wait_for("the watcher's markers on n2", WAIT, |s| s.len() == 3)
        .await?;
    let right_codec = codec(Auth::with_secret(&secret)?);
    let captured: Vec<Vec<u8>> = tap
        .messages()
        .into_iter()
        .filter(|m| {
            right_codec
                .decode(m)
                .is_ok_and(|e| e.header.from.id.as_str() == "n2")
        })
        .collect();
    assert!(
        captured.len() >= 3,
        "captured w2's open and frames: {} envelopes",
        captured.len()
    );
    drop(tap);
    wait_until("the eavesdropper gone from n1's inbox", WAIT, || async {
        let subscribers = cluster
            .redis()
            .command(&["PUBSUB", "NUMSUB", &inbox])
            .await?;
        let gone = matches!(&subscribers, Resp::Array(Some(v)) if v.get(1) == Some(&Resp::Int(1)));
        anyhow::Ok(gone.then_some(()).ok_or_else(|| format!("{subscribers:?}")))
    })
    .await?;
    let mut before: Vec<String> = w1.contents();
    assert_eq!(
        cluster.holder(DOC).await?.map(|h| h.node).as_deref(),
        Some("n1")
    );

    let bcast = keys.bcast();
    let baseline = rejected(&cluster).await?;
    let attached =
        |m: cluster_tests::testbed::Metrics| m.sum("hearth_cluster_proxied_attachments", &[]);
    let attachments_before = attached(cluster.metrics(0).await?);
    assert_eq!(attachments_before, 1.0, "w2 is attached to n1 through n2");

    // --- the forgeries ---
    let unsigned = codec(Auth::disabled());
    let wrong = codec(Auth::with_secret(random_secret().as_bytes())?);
    let right = codec(Auth::with_secret(&secret)?);
    let mut unknown_key = attack(&right, &n1, "intruder:unknown-key")?;
    for env in &mut unknown_key {
        // the key id (after the format tag) is covered by the MAC; 7 is reserved
        env[1] = 7;
    }
    let mut tampered = attack(&right, &n1, "intruder:tamper")?;
    for env in &mut tampered {
        // change the last byte of the signed body
        if let Some(b) = env.last_mut() {
            *b ^= 0x01;
        }
    }
    let mut to_n1: Vec<Vec<u8>> = vec![b"\x00not an envelope".to_vec(), b"\x02\x00short".to_vec()];
    to_n1.extend(attack(&unsigned, &n1, "intruder:unsigned")?);
    to_n1.extend(attack(&wrong, &n1, "intruder:wrong-secret")?);
    to_n1.extend(unknown_key);
    to_n1.extend(tampered);
    for payload in &to_n1 {
        assert_eq!(
            publish(&cluster, &inbox, payload).await?,
            1,
            "n1 subscribes its inbox"
        );
    }
    for payload in [
        forged_draining(&unsigned, &n1)?,
        forged_draining(&wrong, &n1)?,
    ] {
        assert_eq!(
            publish(&cluster, &bcast, &payload).await?,
            3,
            "every node subscribes"
        );
    }
    let expected_n1: BTreeMap<String, u64> = [
        ("unknown_format", 1),
        ("malformed", 1),
        ("unsigned", 3 + 1),
        ("bad_mac", 3 + 3 + 1),
        ("unknown_key", 3),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v + baseline[0].get(k).copied().unwrap_or(0)))
    .collect();
    let what = format!(
        "rejections counted: n1 {expected_n1:?}, and one unsigned plus one bad_mac more than \
         {baseline:?} on n2, n3"
    );
    let counted = wait_until(&what, WAIT, || async {
        let now = rejected(&cluster).await?;
        let others_ok = (1..3).all(|i| {
            let mut want = baseline[i].clone();
            *want.entry("unsigned".into()).or_default() += 1;
            *want.entry("bad_mac".into()).or_default() += 1;
            now[i] == want
        });
        let all = now[0] == expected_n1 && others_ok;
        anyhow::Ok(if all {
            Ok(now)
        } else {
            Err(format!("{now:?}"))
        })
    })
    .await?;
    eprintln!("[{test}] rejected envelopes per node: {counted:?}");

    // --- no effect ---
    // Every forgery was counted as rejected. A marker w2 sends now takes the forgeries' path
    // after them (n1's inbox, its document, the broadcasts to w1 and through n2 to w2): once
    // both watchers have it, an effect of any forgery would have reached them too.
    let barrier = w2.insert_next();
    w2.wait_all_acked(WAIT).await?;
    w1.wait_for("w2's marker after the forgeries", WAIT, |s| {
        s.contents().contains(&barrier)
    })
    .await?;
    before.push(barrier);
    assert_eq!(
        w1.contents(),
        before,
        "the owner-side watcher's document changed"
    );
    assert_eq!(
        w2.contents(),
        before,
        "the edge-side watcher's document changed"
    );
    let fresh =
        TestClient::connect_with(&cluster.lb.url(), DOC, ClientOptions::labelled("f")).await?;
    assert_eq!(
        fresh.contents(),
        before,
        "a fresh client is served something else"
    );
    let blobs = cluster.stored_blobs(DOC)?;
    for m in [
        "intruder:unsigned",
        "intruder:wrong-secret",
        "intruder:unknown-key",
        "intruder:tamper",
    ] {
        assert!(
            blobs.iter().all(|b| marker_hits(b, m) == 0),
            "{m} was stored"
        );
    }
    assert_eq!(
        attached(cluster.metrics(0).await?),
        attachments_before,
        "no session was opened for the stranger"
    );
    assert!(
        w2.view(|s| s.connected()),
        "the forged `draining` did not disturb the proxied watcher"
    );

    // --- replay: signed envelopes n2 really sent to n1 (w2's open, frames, keepalives),
    // captured by the eavesdropper and published again, are dropped as duplicates ---
    let out_of_order =
        |m: &cluster_tests::testbed::Metrics| m.sum(REJECTED, &[("reason", "out_of_order")]);
    let ooo_before = out_of_order(&cluster.metrics(0).await?);
    for payload in &captured {
        assert_eq!(publish(&cluster, &inbox, payload).await?, 1);
    }
    let what = format!(
        "n1 counting the {} replayed envelopes as out of order",
        captured.len()
    );
    wait_until(&what, WAIT, || async {
        let counted = out_of_order(&cluster.metrics(0).await?) - ooo_before;
        anyhow::Ok(
            (counted >= captured.len() as f64)
                .then_some(())
                .ok_or_else(|| format!("{counted}")),
        )
    })
    .await?;
    // w2's attachment still works (a replayed `open` would have replaced it with a fresh,
    // unauthenticated one)
    let m = w2.insert_next();
    w2.wait_all_acked(WAIT).await?;
    w1.wait_for("w2's marker after the replay", WAIT, |s| {
        s.contents().contains(&m)
    })
    .await?;
    eprintln!(
        "[{test}] {} captured envelopes replayed: all dropped as out of order; w2 unaffected",
        captured.len()
    );

    // --- control: correctly signed, the same attack works ---
    for payload in attack(&right, &n1, "intruder:signed")? {
        assert_eq!(publish(&cluster, &inbox, &payload).await?, 1);
    }
    for (who, w) in [("w1", &w1), ("w2", &w2)] {
        w.wait_for(&format!("the signed control marker at {who}"), WAIT, |s| {
            s.contents().iter().any(|m| m == "intruder:signed")
        })
        .await?;
    }
    eprintln!(
        "[{test}] control: a correctly signed forgery is accepted (so the rejected ones were \
         well-formed)"
    );
    for c in [&w1, &w2, &fresh] {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}
