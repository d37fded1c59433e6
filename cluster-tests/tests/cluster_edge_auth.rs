//! Read-only and denied clients attached through a node that does not own the document behave
//! exactly as on the owner (docs/cluster.md "Proxying": the owner runs the same state machine
//! for a proxied client).
//!
//! Three nodes with the token table `rw=read-write,ro=read-only,bad=deny,*=deny`. `acl` is owned
//! by n1 (a read-write watcher connected there first and wrote a few markers; a second watcher
//! sits on n3), `acl-far-owner` and `acl-far-edge` by n3. The same scripts run on a raw socket attached to the owner n1 and
//! on one attached to the edge n2, and their transcripts (every server frame, Pings excepted,
//! payloads reduced to empty/data) must be identical:
//!
//! * read-only: `Authenticated(readonly)` and the document; our step2 (nothing new) is
//!   acknowledged, our update and a later step2 carrying an edit get `SyncStatus(0)`; our
//!   awareness state still reaches the watchers (and is removed when we leave). The update never reaches anybody: not the watchers, not a fresh client, not the
//!   database.
//! * denied: `PermissionDenied(permission-denied)` for `acl`; an update sent for it afterwards
//!   goes nowhere; the socket stays open, and on the same socket a read-write `acl-<where>` (a new
//!   document, claimed by the node the socket is on) and `acl-far` (owned by n3, so proxied from
//!   both n1 and n2) authenticate, sync and get their updates acknowledged and delivered.

use std::time::Duration;

use cluster_tests::testbed::client::{ServerMsg, auth_frame};
use cluster_tests::testbed::raw::{awareness, marker_update, step1, step2, update};
use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, RawSocket, Scratch, TestClient, WAIT, marker_hits,
};

const TOKENS: &str = "rw=read-write,ro=read-only,bad=deny,*=deny";
const V: Option<&str> = Some("4.8.0");
const SETTLE: Duration = Duration::from_millis(300);

fn is_status(m: &ServerMsg) -> bool {
    matches!(m, ServerMsg::SyncStatus(_))
}

/// The read-only script on a socket to `url`; returns the transcript. Its awareness state must
/// reach every watcher while it is connected, and be removed when it leaves.
async fn read_only_script(
    url: &str,
    where_: &str,
    client: u64,
    watchers: &[&TestClient],
) -> anyhow::Result<Vec<String>> {
    let s = RawSocket::connect(url).await?;
    s.send(auth_frame("acl", "ro", V));
    s.send(step1("acl"));
    s.wait_count("acl", 1, WAIT, |m| matches!(m, ServerMsg::Authenticated(_)))
        .await?;
    s.wait_count("acl", 1, WAIT, |m| matches!(m, ServerMsg::Step2(_)))
        .await?;
    // a fresh provider answers the server's step1 with everything it has: nothing
    s.send(step2("acl", &marker_update_empty()));
    s.wait_count("acl", 1, WAIT, is_status).await?;
    s.send(update(
        "acl",
        &marker_update(client, &format!("ro-{where_}:1")),
    ));
    s.wait_count("acl", 2, WAIT, is_status).await?;
    // a step2 with something new (an offline edit) is refused too
    s.send(step2(
        "acl",
        &marker_update(client + 10, &format!("ro-{where_}:2")),
    ));
    s.wait_count("acl", 3, WAIT, is_status).await?;
    let state = format!(r#"{{"ro":"{where_}"}}"#);
    s.send(awareness("acl", client, 1, Some(&state)));
    for w in watchers {
        w.wait_for("the read-only client's awareness", WAIT, |st| {
            st.awareness().get(&client) == Some(&state)
        })
        .await?;
    }
    s.settle(SETTLE, WAIT).await;
    assert!(s.undecodable().is_empty(), "{:?}", s.undecodable());
    assert_eq!(s.closed(), None, "the read-only socket stays open");
    let transcript = s.transcript("acl");
    drop(s);
    for w in watchers {
        w.wait_for("the read-only client's awareness removed", WAIT, |st| {
            !st.awareness().contains_key(&client)
        })
        .await?;
    }
    Ok(transcript)
}

/// An empty Yjs v1 update (no structs, empty delete set).
fn marker_update_empty() -> Vec<u8> {
    vec![0, 0]
}

/// The denied script; returns the transcripts of `acl`, the socket's own new document and `far`
/// (a document owned by n3).
async fn denied_script(
    cluster: &Cluster,
    node: usize,
    where_: &str,
    client: u64,
    far: &str,
) -> anyhow::Result<[Vec<String>; 3]> {
    let s = RawSocket::connect(&cluster.nodes[node].url()).await?;
    s.send(auth_frame("acl", "bad", V));
    s.send(step1("acl"));
    s.wait_count("acl", 1, WAIT, |m| {
        matches!(m, ServerMsg::PermissionDenied(_))
    })
    .await?;
    s.send(update(
        "acl",
        &marker_update(client, &format!("bad-{where_}:1")),
    ));
    let own = format!("acl-{where_}");
    for doc in [own.as_str(), far] {
        s.send(auth_frame(doc, "rw", V));
        s.send(step1(doc));
        s.wait_count(doc, 1, WAIT, |m| matches!(m, ServerMsg::Step2(_)))
            .await?;
        s.send(update(
            doc,
            &marker_update(client, &format!("{doc}-{where_}:1")),
        ));
        s.wait_count(doc, 1, WAIT, is_status).await?;
    }
    s.settle(SETTLE, WAIT).await;
    assert!(s.undecodable().is_empty(), "{:?}", s.undecodable());
    assert_eq!(s.closed(), None, "a denied document leaves the socket open");
    let owner = cluster.holder(&own).await?.map(|h| h.node);
    assert_eq!(
        owner.as_deref(),
        Some(cluster.nodes[node].id()),
        "{own} is claimed by the node the socket is on"
    );
    Ok([s.transcript("acl"), s.transcript(&own), s.transcript(far)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_denied_clients_behave_the_same_through_an_edge() -> anyhow::Result<()> {
    let test = "cluster_edge_auth";
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(3).env("HEARTH_AUTH_TOKENS", TOKENS);
    let cluster = Cluster::start(&scratch, spec).await?;
    let rw = |label: &str| ClientOptions::labelled(label).token("rw");

    let watcher = TestClient::connect_with(&cluster.nodes[0].url(), "acl", rw("w1")).await?;
    let far_owner_c =
        TestClient::connect_with(&cluster.nodes[2].url(), "acl-far-owner", rw("fo")).await?;
    let far_edge_c =
        TestClient::connect_with(&cluster.nodes[2].url(), "acl-far-edge", rw("fe")).await?;
    let watcher3 = TestClient::connect_with(&cluster.nodes[2].url(), "acl", rw("w3")).await?;
    for _ in 0..3 {
        watcher.insert_next();
    }
    watcher.wait_all_acked(WAIT).await?;
    assert_eq!(
        cluster.holder("acl").await?.map(|h| h.node).as_deref(),
        Some("n1")
    );
    for far in ["acl-far-owner", "acl-far-edge"] {
        assert_eq!(
            cluster.holder(far).await?.map(|h| h.node).as_deref(),
            Some("n3")
        );
    }

    // --- read-only ---
    let watchers = [&watcher, &watcher3];
    let ro_owner = read_only_script(&cluster.nodes[0].url(), "owner", 1001, &watchers).await?;
    let ro_edge = read_only_script(&cluster.nodes[1].url(), "edge", 1002, &watchers).await?;
    eprintln!("[{test}] read-only transcript (owner): {ro_owner:?}");
    assert_eq!(
        ro_owner, ro_edge,
        "read-only: owner-attached vs edge-attached transcript"
    );
    assert_eq!(
        ro_owner.first().map(String::as_str),
        Some("Authenticated(readonly)")
    );
    assert_eq!(
        ro_owner
            .iter()
            .filter(|t| t.starts_with("SyncStatus"))
            .collect::<Vec<_>>(),
        ["SyncStatus(1)", "SyncStatus(0)", "SyncStatus(0)"],
        "our empty step2 is acknowledged, our update and our step2 with news rejected"
    );
    // --- denied, and the rest of the socket keeps working ---
    let [acl_owner, own_owner, far_owner] =
        denied_script(&cluster, 0, "owner", 2001, "acl-far-owner").await?;
    let [acl_edge, own_edge, far_edge] =
        denied_script(&cluster, 1, "edge", 2002, "acl-far-edge").await?;
    eprintln!(
        "[{test}] denied transcript (owner): {acl_owner:?}; other documents {own_owner:?} {far_owner:?}"
    );
    assert_eq!(
        acl_owner, acl_edge,
        "denied: owner-attached vs edge-attached transcript"
    );
    assert_eq!(acl_owner, ["PermissionDenied(permission-denied)"]);
    assert_eq!(own_owner, own_edge, "a second document on the same socket");
    assert_eq!(far_owner, far_edge, "a proxied document on the same socket");
    for t in [&own_owner, &far_owner] {
        assert_eq!(
            t.first().map(String::as_str),
            Some("Authenticated(read-write)")
        );
        assert!(t.contains(&"SyncStatus(1)".to_string()), "{t:?}");
    }

    // --- nothing from the read-only or denied clients reached anybody ---
    // (a refused update forwarded by the edge has no answer to wait for: give it time to show)
    tokio::time::sleep(SETTLE).await;
    let forbidden = [
        "ro-owner:1",
        "ro-edge:1",
        "ro-owner:2",
        "ro-edge:2",
        "bad-owner:1",
        "bad-edge:1",
    ];
    let fresh = TestClient::connect_with(&cluster.lb.url(), "acl", rw("fresh")).await?;
    for (who, c) in [("w1", &watcher), ("w3", &watcher3), ("fresh", &fresh)] {
        let contents = c.contents();
        assert_eq!(
            contents.len(),
            3,
            "{who} sees only the watcher's markers: {contents:?}"
        );
    }
    let blobs = cluster.stored_blobs("acl")?;
    for m in forbidden {
        assert!(
            blobs.iter().all(|b| marker_hits(b, m) == 0),
            "{m} was stored"
        );
    }
    // ... while the updates of the other documents were delivered and stored
    for (c, m) in [
        (&far_owner_c, "acl-far-owner-owner:1"),
        (&far_edge_c, "acl-far-edge-edge:1"),
    ] {
        c.wait_for(
            "the denied socket's update on its other document",
            WAIT,
            |s| s.contents() == [m.to_string()],
        )
        .await?;
    }
    for where_ in ["owner", "edge"] {
        let doc = format!("acl-{where_}");
        let c = TestClient::connect_with(&cluster.lb.url(), &doc, rw("fresh")).await?;
        assert_eq!(c.contents(), [format!("{doc}-{where_}:1")]);
    }
    for c in [&watcher, &watcher3, &far_owner_c, &far_edge_c, &fresh] {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}
