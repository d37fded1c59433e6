//! Webhooks in a cluster, seen by the real `@hocuspocus/provider` (docs/auth.md): two nodes ask
//! the same endpoint about every document a client opens, and send it their events. Each case's
//! provider connects to n1 (the owner of every document) and to n2 (a non-owner proxying to n1)
//! and must see the same answer; the `connect` events of both arrive signed, from the owner.

#[path = "../../tests/common/receiver.rs"]
#[allow(dead_code, clippy::unwrap_used)]
mod receiver;

use std::time::Duration;

use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, run_auth_cases, wait_until,
};
use receiver::{Received, Receiver};
use serde_json::{Value, json};

const SECRET: &str = "cluster-webhook-secret-0123456789";

/// Authentication requests by token; everything else is an event, answered 200.
fn answer(r: &Received) -> (u16, String, Duration) {
    let event = r.body["event"].as_str().unwrap_or_default();
    if event != "authenticate" && event != "token_sync" {
        return (200, "{}".into(), Duration::ZERO);
    }
    let body = |v: Value| (200, v.to_string(), Duration::ZERO);
    match r.body["token"].as_str().unwrap_or_default() {
        "opener" | "allow" => body(json!({"access": "read-write",
                                          "context": {"user": {"id": "u-1"}}})),
        "ro" => body(json!({"access": "read-only"})),
        "deny" => body(json!({"access": "deny", "reason": "not your document"})),
        "slow" => (
            200,
            json!({"access": "read-write"}).to_string(),
            Duration::from_millis(300),
        ),
        _ => (500, "{}".into(), Duration::ZERO),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_sees_the_same_answer_on_the_owner_and_through_a_non_owner()
-> anyhow::Result<()> {
    let hook = Receiver::start(SECRET, answer).await;
    let scratch = Scratch::new("cluster_webhooks")?;
    let cluster = Cluster::start(
        &scratch,
        ClusterSpec::new(2)
            .env("HEARTH_AUTH_WEBHOOK_URL", &hook.url)
            .env("HEARTH_AUTH_WEBHOOK_SECRET", SECRET)
            .env("HEARTH_AUTH_WEBHOOK_CACHE_MS", "0")
            .env("HEARTH_WEBHOOK_URL", &hook.url)
            .env("HEARTH_WEBHOOK_SECRET", SECRET)
            .env("HEARTH_WEBHOOK_EVENTS", "connect")
            .env("HEARTH_AUTH_FAILURES_BEFORE_BAN", "0"),
    )
    .await?;
    let cases = [
        ("allow", "wh-a", "allow", "read-write", None),
        ("read-only", "wh-b", "ro", "readonly", None),
        ("deny", "wh-c", "deny", "denied", Some("not your document")),
        (
            "endpoint failing",
            "wh-d",
            "error",
            "denied",
            Some("authentication unavailable"),
        ),
        ("slow endpoint", "wh-e", "slow", "read-write", None),
    ];
    let mut list = Vec::new();
    let mut openers = Vec::new();
    for (label, doc, token, expect, reason) in cases {
        // n1 owns every document: a client opens each there first
        openers.push(
            TestClient::connect_with(
                &cluster.nodes[0].url(),
                doc,
                ClientOptions::labelled(format!("opener-{doc}")).token("opener"),
            )
            .await?,
        );
        for (node, where_) in [(0usize, "owner"), (1usize, "non-owner")] {
            let mut case = json!({
                "label": format!("{label} ({where_})"),
                "url": cluster.nodes[node].url(),
                "doc": doc,
                "token": token,
                "expect": expect,
            });
            if let Some(r) = reason {
                case["reason"] = json!(r);
            }
            list.push(case);
        }
    }
    run_auth_cases(list, &cluster.nodes[0].url()).await?;

    // every request was signed; each node asked for its own clients (n2 for those attached
    // through it, n1 again as the owner)
    let all = hook.all();
    assert!(all.iter().all(|r| r.signed), "unsigned request");
    let asked_by = |node: &str| {
        all.iter()
            .filter(|r| r.body["event"] == "authenticate" && r.body["node"] == node)
            .count()
    };
    assert!(asked_by(cluster.nodes[0].id()) > 0 && asked_by(cluster.nodes[1].id()) > 0);
    // a client allowed through n2 is reported by the owner, n1, with its context
    let n1 = cluster.nodes[0].id();
    let connects: Vec<&Received> = all
        .iter()
        .filter(|r| r.body["event"] == "connect" && r.body["payload"]["documentName"] == "wh-a")
        .collect();
    // the opener, the owner case, the non-owner case
    let what = format!("three connect webhooks for wh-a; the first ones: {connects:?}");
    let connects_n = wait_until(&what, Duration::from_secs(5), || async {
        let connects_n = hook
            .all()
            .iter()
            .filter(|r| r.body["event"] == "connect" && r.body["payload"]["documentName"] == "wh-a")
            .count();
        anyhow::Ok(if connects_n >= 3 {
            Ok(connects_n)
        } else {
            Err(format!("{connects_n}"))
        })
    })
    .await?;
    assert_eq!(connects_n, 3, "{connects:?}");
    for r in hook
        .all()
        .iter()
        .filter(|r| r.body["event"] == "connect" && r.body["payload"]["documentName"] == "wh-a")
    {
        assert_eq!(r.body["payload"]["node"], n1, "events come from the owner");
        assert_eq!(r.body["payload"]["context"]["user"]["id"], "u-1");
    }
    drop(openers);
    Ok(())
}
