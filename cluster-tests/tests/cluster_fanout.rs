//! Per-node fan-out between a document's owner and a node with several of its clients.
//!
//! Two nodes; the writer's client on n1 claims the document, four readers sit on n2. Every
//! update the writer makes is a frame for all four readers; with batching on (the default) it
//! crosses Redis once, as one `fan` carrying the four connection ids, and n2 hands it to each
//! reader. The test counts n1's publishes (`hearth_cluster_messages_published_total`) and the
//! frames that travelled merged (`hearth_cluster_fanned_frames_total`) over a run of updates
//! made one at a time, checks that every reader received every update and that every update was
//! acknowledged. The same run with `HEARTH_CLUSTER_BATCHING=false` publishes one message per
//! reader and update, merges nothing, and converges just the same.
//!
//! `hearth cluster decode` prints a captured batch, one JSON line per envelope.

use std::time::Duration;

use cluster_tests::testbed::{ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, WAIT};
use hearth_proxy::{
    Auth, Body, Codec, ConnId, Incarnation, NodeAddr, NodeId, Secret, Secrets, Session,
};

const READERS: usize = 4;
const UPDATES: usize = 100;

struct Run {
    published: f64,
    fanned: f64,
}

async fn run(test: &str, batching: bool) -> anyhow::Result<Run> {
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(2).env("HEARTH_CLUSTER_BATCHING", batching.to_string());
    let cluster = Cluster::start(&scratch, spec).await?;
    let doc = "fanned";
    let writer =
        TestClient::connect_with(&cluster.nodes[0].url(), doc, ClientOptions::labelled("w"))
            .await?;
    let mut readers = Vec::new();
    for r in 0..READERS {
        readers.push(
            TestClient::connect_with(
                &cluster.nodes[1].url(),
                doc,
                ClientOptions::labelled(format!("r{r}")),
            )
            .await?,
        );
    }
    assert_eq!(cluster.cli_owner(doc).await?.as_deref(), Some("n1"));
    for r in &readers {
        r.wait_for("synced", WAIT, |s| s.synced()).await?;
    }
    let metric = |m: &cluster_tests::testbed::Metrics, name: &str| m.sum(name, &[]);
    let before = cluster.metrics(0).await?;
    for _ in 0..UPDATES {
        writer.insert_next();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.wait_all_acked(WAIT).await?;
    for r in &readers {
        r.wait_for("every update", WAIT, |s| s.len() as usize == UPDATES)
            .await?;
        assert_eq!(r.contents(), writer.contents(), "{}", r.client_id());
        let anomalies = r.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    let after = cluster.metrics(0).await?;
    let published = metric(&after, "hearth_cluster_messages_published_total")
        - metric(&before, "hearth_cluster_messages_published_total");
    let fanned = metric(&after, "hearth_cluster_fanned_frames_total")
        - metric(&before, "hearth_cluster_fanned_frames_total");
    eprintln!(
        "[{test}] batching {batching}: {UPDATES} updates for {READERS} readers on the other node: \
         {published} messages published by the owner, {fanned} frames merged into a fan"
    );
    Ok(Run { published, fanned })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_for_several_clients_of_one_node_crosses_redis_once() -> anyhow::Result<()> {
    let on = run("cluster_fanout_on", true).await?;
    // One message per update (plus a few keepalives and the like), where one per reader and
    // update would be READERS × UPDATES.
    let limit = (UPDATES + UPDATES / 10) as f64;
    assert!(on.published <= limit, "{} messages > {limit}", on.published);
    let merged = ((READERS - 1) * UPDATES) as f64;
    assert!(
        on.fanned >= merged * 0.95,
        "{} frames merged, want ≈ {merged}",
        on.fanned
    );

    let off = run("cluster_fanout_off", false).await?;
    assert_eq!(off.fanned, 0.0);
    assert!(
        off.published >= (READERS * UPDATES) as f64,
        "{} messages without batching",
        off.published
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_decode_prints_each_envelope_of_a_batch() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_decode")?;
    let cluster = Cluster::start(&scratch, ClusterSpec::new(1)).await?;
    let secret = Secret::new(cluster.secret().to_owned())?;
    let codec = Codec::new(Auth::new(&Secrets::new(secret)), 1 << 20);
    let node = |name: &str| -> anyhow::Result<NodeAddr> {
        Ok(NodeAddr::new(NodeId::new(name)?, Incarnation(7)))
    };
    let conns = [ConnId::generate(), ConnId::generate()];
    let bodies = [
        Body::Fan {
            doc: "d".into(),
            epoch: 3,
            conns: conns.to_vec(),
            data: vec![0, 2, 1, 5],
        },
        Body::Out {
            session: Session {
                conn: conns[0],
                doc: "d".into(),
                epoch: 3,
            },
            data: vec![0, 1, 0],
        },
    ];
    let bytes = codec.encode_batch(&node("a")?, Some(&node("b")?), 41, &bodies)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let run = cluster
        .cli_with(
            &["cluster", "decode", "--hex"],
            &[],
            Some(hex.as_bytes()),
            WAIT,
        )
        .await?;
    let out = String::from_utf8_lossy(&run.stdout);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(run.code, Some(0), "{out}");
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["t"], "fan");
    assert_eq!(lines[0]["seq"], 41);
    assert_eq!(lines[0]["verified"], true);
    assert_eq!(lines[0]["batch_of"], 2);
    assert_eq!(lines[0]["b"]["conns"][1], conns[1].to_string());
    assert_eq!(lines[1]["t"], "out");
    assert_eq!(lines[1]["seq"], 42);
    assert_eq!(lines[1]["b"]["data"]["hex"], "000100");

    // one byte changed: rejected, exit status 1
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let run = cluster
        .cli_with(&["cluster", "decode"], &[], Some(&bad), WAIT)
        .await?;
    let out = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.code, Some(1), "{out}");
    assert!(out.contains("\"rejected\":\"bad_mac\""), "{out}");
    Ok(())
}
