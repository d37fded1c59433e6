//! A publish that fails is not taken for a gone owner.
//!
//! Two nodes; the second (the edge) connects to Redis as an ACL user of its own. A client on
//! the first node opens the document there (that node owns it) and a client on the edge is
//! proxied to it. Then the edge's user loses the right to publish on the owner's inbox: every
//! envelope the edge sends the owner (its keepalives) fails with `NOPERM`, while the owner stays
//! alive, subscribed and heard from. For several housekeeping rounds:
//!
//! * the edge logs the failed publishes, and neither moves nor resets its client (a failed
//!   publish says nothing about the owner; only a publish that reached no subscriber does);
//! * once the right is back, the owner finds the link's failed envelopes missing and resets the
//!   client (4205) instead of skipping them; a client connecting again through the edge edits
//!   with the owner's client both ways and is served every earlier edit.

use cluster_tests::testbed::redis::Resp;
use cluster_tests::testbed::{Cluster, ClusterSpec, Scratch, TestClient, WAIT};

/// The edge's Redis user and password.
const USER: &str = "edge";
const PASSWORD: &str = "edge-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_neither_moves_nor_resets_a_proxied_client() -> anyhow::Result<()> {
    let test = "cluster_publish_failure";
    let scratch = Scratch::new(test)?;
    let mut cluster = Cluster::start(&scratch, ClusterSpec::new(2).lock_ttl_ms(2000)).await?;
    let password = format!(">{PASSWORD}");
    cluster
        .redis_command(&["ACL", "SETUSER", USER, "on", &password, "~*", "&*", "+@all"])
        .await?;
    let edge_url =
        cluster
            .redis_url()
            .replacen("redis://", &format!("redis://{USER}:{PASSWORD}@"), 1);
    let edge = &mut cluster.nodes[1];
    edge.spec_mut()
        .env
        .push(("HEARTH_REDIS_URL".into(), edge_url));
    edge.restart().await?;

    let doc = "publish-failure";
    let owner_client = TestClient::connect(&cluster.nodes[0].url(), doc, "").await?;
    let owner_id = cluster.nodes[0].id().to_string();
    assert_eq!(
        cluster.holder(doc).await?.map(|h| h.node),
        Some(owner_id.clone())
    );
    let proxied = TestClient::connect(&cluster.nodes[1].url(), doc, "").await?;
    proxied.insert("before");
    owner_client
        .wait_for("the proxied client's edit", WAIT, |s| {
            s.contents().iter().any(|m| m == "before")
        })
        .await?;

    // Every channel the edge's user may use: what is subscribed now, but the owner's inbox.
    let owner_inbox = format!("{}:inbox:{owner_id}:", cluster.prefix());
    let channels = match cluster.redis_command(&["PUBSUB", "CHANNELS", "*"]).await? {
        Resp::Array(Some(items)) => items.iter().filter_map(Resp::as_str).collect::<Vec<_>>(),
        other => anyhow::bail!("PUBSUB CHANNELS answered {other:?}"),
    };
    assert!(
        channels.iter().any(|c| c.starts_with(&owner_inbox)),
        "the owner's inbox is subscribed: {channels:?}"
    );
    let mut revoke: Vec<String> = vec![
        "ACL".into(),
        "SETUSER".into(),
        USER.into(),
        "resetchannels".into(),
    ];
    revoke.extend(
        channels
            .iter()
            .filter(|c| !c.starts_with(&owner_inbox))
            .map(|c| format!("&{c}")),
    );
    let revoke: Vec<&str> = revoke.iter().map(String::as_str).collect();
    cluster.redis_command(&revoke).await?;

    // housekeeping runs every lock TTL / 3: six rounds
    tokio::time::sleep(cluster.lock_ttl() * 2).await;
    let log = cluster.nodes[1].log_text();
    assert!(
        log.contains("publish failed"),
        "the edge's publishes to the owner failed meanwhile:\n{log}"
    );
    let metrics = cluster.nodes[1].metrics().await?;
    let moved = metrics.sum("hearth_cluster_client_moves_total", &[]);
    let reset = metrics.sum("hearth_cluster_resyncs_total", &[]);
    assert_eq!(
        (moved, reset),
        (0.0, 0.0),
        "the edge moved or reset its client:\n{log}"
    );
    assert!(
        proxied.view(|s| s.connected() && s.socket_close().is_none()),
        "the proxied client was disconnected:\n{log}"
    );

    // The right comes back. The keepalives that failed had their numbers on the link, so the
    // owner finds envelopes missing at the edge's next one and resets the client (4205): a
    // lost envelope is never skipped silently. The client reconnects and finds every edit.
    cluster
        .redis_command(&["ACL", "SETUSER", USER, "allchannels"])
        .await?;
    proxied.insert("after");
    proxied
        .wait_for("the reset after the lost envelopes", WAIT, |s| {
            s.socket_close().is_some()
        })
        .await?;
    assert_eq!(
        proxied.view(|s| s.socket_close().map(|(code, _)| code)),
        Some(4205),
        "the client is reset, to reconnect and resync"
    );
    let again = TestClient::connect(&cluster.nodes[1].url(), doc, "").await?;
    again.insert("again");
    owner_client
        .wait_for("the reconnected client's edit", WAIT, |s| {
            s.contents().iter().any(|m| m == "again")
        })
        .await?;
    owner_client.insert("reply");
    again
        .wait_for("the owner's client's edit", WAIT, |s| {
            s.contents().iter().any(|m| m == "reply")
        })
        .await?;
    assert!(
        again.contents().iter().any(|m| m == "before"),
        "the reconnected client is served the document: {:?}",
        again.contents()
    );
    Ok(())
}
