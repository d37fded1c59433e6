//! A document larger than one cross-node envelope, served to a client through a non-owner node
//! (docs/cluster.md, "Envelope schema": `part`).
//!
//! `HEARTH_MAX_MESSAGE_BYTES` is lowered to 1 MiB, so the envelope cap is 1 MiB + 4 KiB, and a
//! client on the owner seeds about 3 MiB in updates of 512 KiB each. A client that then connects
//! through the other node needs the owner's SyncStep2 for all of it: one frame of about 3 MiB,
//! which only crosses in parts. It must sync and converge, and edits must still flow both ways.
//! Envelopes are signed (the harness gives every cluster a `HEARTH_CLUSTER_SECRET`), so every
//! part carries its own MAC.

use std::sync::Arc;
use std::time::Duration;

use cluster_tests::testbed::{ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, WAIT};
use tokio::time::Instant;

const PIECES: usize = 6;
const PIECE_BYTES: usize = 512 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_document_syncs_through_a_non_owner_node() -> anyhow::Result<()> {
    let test = "cluster_large_doc";
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(2).env("HEARTH_MAX_MESSAGE_BYTES", (1 << 20).to_string());
    let cluster = Cluster::start(&scratch, spec).await?;
    let doc = "large";
    let url = |i: usize| cluster.nodes[i].url();

    // The first client lands on n1, which claims the document, and seeds it.
    let a = Arc::new(TestClient::connect_with(&url(0), doc, ClientOptions::labelled("a")).await?);
    assert_eq!(
        cluster.holder(doc).await?.map(|h| h.node).as_deref(),
        Some("n1")
    );
    for i in 0..PIECES {
        let fill = char::from(b'a' + u8::try_from(i)?);
        let piece: String = format!("seed:{i}:") + &fill.to_string().repeat(PIECE_BYTES);
        a.insert(&piece);
    }
    a.wait_all_acked(WAIT * 3).await?;
    let seeded: usize = a.contents().iter().map(String::len).sum();
    assert!(seeded >= PIECES * PIECE_BYTES, "seeded only {seeded} bytes");

    // A client on n2 (proxied to n1) needs all of it in one SyncStep2.
    let started = Instant::now();
    let opts = ClientOptions {
        sync_timeout: Duration::from_secs(30),
        ..ClientOptions::labelled("b")
    };
    let b = Arc::new(TestClient::connect_with(&url(1), doc, opts).await?);
    let synced_in = started.elapsed();
    assert_eq!(
        b.contents(),
        a.contents(),
        "the proxied client's copy differs"
    );
    eprintln!("[{test}] proxied client synced {seeded} bytes in {synced_in:?}");

    // Edits still flow both ways.
    let from_b = b.insert_next();
    let from_a = a.insert_next();
    for (who, c, want) in [("a", &a, &from_b), ("b", &b, &from_a)] {
        c.wait_for(&format!("{want} at {who}"), WAIT, |s| {
            s.contents().contains(want)
        })
        .await?;
    }
    a.wait_all_acked(WAIT).await?;
    b.wait_all_acked(WAIT).await?;
    assert_eq!(b.contents(), a.contents());
    for c in [&a, &b] {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }

    // Nothing was reset or rejected on the way.
    for i in 0..2 {
        let m = cluster.metrics(i).await?;
        let resyncs = m.sum("hearth_cluster_resyncs_total", &[]);
        let rejected = m.sum("hearth_cluster_envelopes_rejected_total", &[]);
        assert_eq!(
            (resyncs, rejected),
            (0.0, 0.0),
            "n{}: resyncs, rejections",
            i + 1
        );
    }
    Ok(())
}

/// Seeds `doc` with about 3 MiB through a client on `url` (which thereby owns it).
async fn seed_large(url: &str, doc: &str, label: &str) -> anyhow::Result<Arc<TestClient>> {
    let c = Arc::new(TestClient::connect_with(url, doc, ClientOptions::labelled(label)).await?);
    for i in 0..PIECES {
        c.insert(&(format!("{label}:{i}:") + &"z".repeat(PIECE_BYTES)));
    }
    c.wait_all_acked(WAIT * 3).await?;
    Ok(c)
}

/// Starts a client on `url` for `doc` and waits until the server closes its socket; returns
/// the close code, or `None` if the client got the document after all.
async fn reset_code(url: &str, doc: &str, label: &str) -> anyhow::Result<Option<u16>> {
    let c = TestClient::start(url, doc, ClientOptions::labelled(label)).await?;
    c.wait_for("socket closed by the server", WAIT, |s| !s.connected())
        .await?;
    Ok(c.view(|s| {
        if s.synced() {
            None
        } else {
            s.socket_close().map(|(code, _)| code)
        }
    }))
}

/// `max_proxied_frame_bytes` is exceeded on the sending side (the owner) and on the receiving
/// side (the edge): each time the proxied client is reset with 4205, counted under its reason
/// and logged, and everything else keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_beyond_the_limit_reset_only_their_client() -> anyhow::Result<()> {
    let test = "cluster_large_doc_limits";
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(2).env("HEARTH_MAX_MESSAGE_BYTES", (1 << 20).to_string());
    let mut cluster = Cluster::start(&scratch, spec).await?;
    // n2 accepts and sends proxied frames of at most 1 MiB; n1 keeps the 64 MiB default.
    cluster.nodes[1].spec_mut().env.push((
        "HEARTH_MAX_PROXIED_FRAME_BYTES".into(),
        (1 << 20).to_string(),
    ));
    cluster.nodes[1].restart().await?;
    let url = |i: usize| cluster.nodes[i].url();
    let resyncs = |m: &cluster_tests::testbed::Metrics, reason: &str| {
        m.sum("hearth_cluster_resyncs_total", &[("reason", reason)])
    };

    // Receiving side: n1 owns "big-1" and sends its 3 MiB in parts; n2 stops at 1 MiB.
    let a = seed_large(&url(0), "big-1", "a").await?;
    assert_eq!(reset_code(&url(1), "big-1", "b").await?, Some(4205));
    let m2 = cluster.metrics(1).await?;
    assert!(
        resyncs(&m2, "part_too_large") >= 1.0,
        "n2 counted no part_too_large"
    );
    assert!(
        cluster.nodes[1]
            .log_text()
            .contains("a frame sent in parts was dropped before it was complete"),
        "n2 logged nothing"
    );

    // Sending side: n2 owns "big-2" and may not send 3 MiB to a client on n1.
    let c = seed_large(&url(1), "big-2", "c").await?;
    assert_eq!(reset_code(&url(0), "big-2", "d").await?, Some(4205));
    let m2 = cluster.metrics(1).await?;
    assert!(
        resyncs(&m2, "frame_too_large") >= 1.0,
        "n2 counted no frame_too_large"
    );
    assert!(
        cluster.nodes[1]
            .log_text()
            .contains("exceeds max_proxied_frame_bytes"),
        "n2 logged nothing"
    );

    // Everything else still works: the owners' own clients, and small proxied documents.
    for cl in [&a, &c] {
        cl.insert_next();
        cl.wait_all_acked(WAIT).await?;
    }
    let e = TestClient::connect_with(&url(0), "small", ClientOptions::labelled("e")).await?;
    let f = TestClient::connect_with(&url(1), "small", ClientOptions::labelled("f")).await?;
    let from_f = f.insert_next();
    e.wait_for("f's edit at e", WAIT, |s| s.contents().contains(&from_f))
        .await?;
    for i in 0..2 {
        assert_eq!(cluster.nodes[i].readyz().await?, 200);
    }
    Ok(())
}
