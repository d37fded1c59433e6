//! The admin API in a cluster (3 nodes, real Redis and PostgreSQL; docs/admin-api.md).
//!
//! * `every_operation_through_any_node`: a document owned by n1 (a client there) is edited,
//!   read, messaged, listed, looked up and closed (Hocuspocus's reset) through n2 and n3, a
//!   client on n2 getting the message and the reset too; a document nobody owns is
//!   claimed by the node asked (or refused with `claim=false`), then deleted; n3 is drained
//!   through n1 (not ready, nothing loaded, its document readable through another node); custom events of
//!   `hearth-test-server` answer through a non-owner; the CLI gives the documented exit codes.
//! * `timeouts_never_hang`: the owner stopped (SIGSTOP) → 504 within the deadline; the owner
//!   killed → an answer (timeout, unavailable, or the survivor took over) within the deadline;
//!   1,000 events in a row through a non-owner leave nothing waiting and nothing loaded there.
//! * `streaming_inserts_while_providers_edit`: 2,000 text inserts through the API while 20
//!   real `@hocuspocus/provider` clients on the three nodes edit the same document: every
//!   client converges and the stored document holds every insert.
//! * `the_examples_run_against_the_cluster`: `examples/admin/admin.mjs` and `admin.py`.

use std::process::Stdio;
use std::time::Duration;

use cluster_tests::testbed::{
    Cluster, ClusterSpec, Scratch, TestClient, WAIT, wait_until, workspace_dir,
};
use serde_json::{Value, json};
use tokio::time::Instant;

const TOKEN: &str = "Hm4Vq9Xc2Lr7Tk1Wb6Zn3Pd8J";
const CLI_LIMIT: Duration = Duration::from_secs(30);

fn spec() -> ClusterSpec {
    ClusterSpec::new(3)
        .binary(env!("CARGO_BIN_EXE_hearth-test-server"))
        .env("HEARTH_ADMIN_TOKENS", TOKEN)
}

/// One admin request to node `i`: (status, JSON body).
async fn call(
    cluster: &Cluster,
    i: usize,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    cluster.nodes[i].admin_call(TOKEN, method, path, body).await
}

async fn ok(
    cluster: &Cluster,
    i: usize,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (st, v) = call(cluster, i, method, path, body).await?;
    anyhow::ensure!(
        (200..300).contains(&st),
        "{method} {path} on n{}: {st} {v}",
        i + 1
    );
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_through_any_node() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_admin_ops")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let doc = "shared";
    let on_n1 = TestClient::connect(&cluster.nodes[0].url(), doc, "").await?;
    assert_eq!(cluster.cli_owner(doc).await?.as_deref(), Some("n1"));

    // edit through a non-owner: the owner's client sees it
    let v = ok(
        &cluster,
        1,
        "POST",
        "/v1/documents/shared/ops",
        Some(json!({ "ops": [
            { "op": "array.push", "type": "log", "values": ["api:n2"] },
            { "op": "text.insert", "type": "body", "text": "from n2" }
        ]})),
    )
    .await?;
    assert_eq!(v["applied"], 2);
    on_n1
        .wait_for("api:n2 on n1", WAIT, |s| {
            s.contents().iter().any(|m| m == "api:n2")
        })
        .await?;
    // read through the third node
    let v = ok(
        &cluster,
        2,
        "GET",
        "/v1/documents/shared?include=json&types=body:text,log:array",
        None,
    )
    .await?;
    assert_eq!(v["json"]["body"], "from n2", "{v}");
    assert!(
        v["json"]["log"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("api:n2"))),
        "{v}"
    );
    // custom events of the test server, through non-owners
    let v = ok(
        &cluster,
        1,
        "POST",
        "/v1/documents/shared/events/whoami",
        Some(json!({})),
    )
    .await?;
    // the test server replies with its node id as plain bytes (not JSON): base64 of "n1"
    assert_eq!(v["reply_base64"], "bjE=", "{v}");
    let (st, v) = call(
        &cluster,
        2,
        "POST",
        "/v1/documents/shared/events/fail",
        Some(json!({})),
    )
    .await?;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (422, Some("handler_error")),
        "{v}"
    );
    let (st, v) = call(
        &cluster,
        2,
        "POST",
        "/v1/documents/shared/events/no-such",
        Some(json!({})),
    )
    .await?;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("no_handler")),
        "{v}"
    );
    // broadcast from n3 reaches the client on the owner and one on n2 (proxied to n1)
    let on_n2 = TestClient::connect(&cluster.nodes[1].url(), doc, "").await?;
    let v = ok(
        &cluster,
        2,
        "POST",
        "/v1/documents/shared/broadcast",
        Some(json!({ "message": "hello from n3" })),
    )
    .await?;
    assert_eq!(v["connections"], 2, "{v}");
    for (c, at) in [(&on_n1, "n1"), (&on_n2, "n2")] {
        c.wait_for(&format!("stateless on {at}"), WAIT, |s| {
            s.stateless().iter().any(|m| m == "hello from n3")
        })
        .await?;
    }
    // owner, list, nodes
    let v = ok(&cluster, 1, "GET", "/v1/documents/shared/owner", None).await?;
    assert_eq!(v["owner"], "n1", "{v}");
    let v = ok(&cluster, 2, "GET", "/v1/documents", None).await?;
    let entry = v["documents"]
        .as_array()
        .and_then(|d| d.iter().find(|e| e["name"] == doc))
        .cloned();
    let entry = entry.ok_or_else(|| anyhow::anyhow!("{doc} not listed: {v}"))?;
    assert_eq!(
        (entry["owner"].as_str(), entry["loaded"].as_bool()),
        (Some("n1"), Some(true)),
        "{entry}"
    );
    assert!(entry["connections"].as_u64() >= Some(1), "{entry}");
    let v = ok(&cluster, 1, "GET", "/v1/nodes", None).await?;
    let mut names: Vec<String> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names, ["n1", "n2", "n3"], "{v}");

    // the same operations through the owner itself
    let v = ok(
        &cluster,
        0,
        "POST",
        "/v1/documents/shared/ops",
        Some(json!({ "ops": [
            { "op": "array.push", "type": "log", "values": ["api:n1"] }
        ]})),
    )
    .await?;
    assert_eq!(v["applied"], 1);
    let v = ok(
        &cluster,
        0,
        "GET",
        "/v1/documents/shared?include=json&types=log:array",
        None,
    )
    .await?;
    assert!(
        v["json"]["log"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("api:n1"))),
        "{v}"
    );
    let v = ok(
        &cluster,
        0,
        "POST",
        "/v1/documents/shared/events/whoami",
        Some(json!({})),
    )
    .await?;
    assert_eq!(v["reply_base64"], "bjE=", "{v}");
    let v = ok(
        &cluster,
        0,
        "POST",
        "/v1/documents/shared/broadcast",
        Some(json!({ "message": "from n1" })),
    )
    .await?;
    assert_eq!(v["connections"], 2, "{v}");
    let v = ok(&cluster, 0, "GET", "/v1/documents/shared/owner", None).await?;
    assert_eq!(v["owner"], "n1", "{v}");

    // on documents nobody owns: broadcast and close reach nobody and claim nothing, an event
    // claims the document for the node asked (which answers it), reading and deleting find
    // nothing
    let v = ok(
        &cluster,
        1,
        "POST",
        "/v1/documents/idle/broadcast",
        Some(json!({ "message": "x" })),
    )
    .await?;
    assert_eq!(v["connections"], 0, "{v}");
    let v = ok(
        &cluster,
        1,
        "POST",
        "/v1/documents/idle/close",
        Some(json!({})),
    )
    .await?;
    assert_eq!(v["connections"], 0, "{v}");
    assert_eq!(
        cluster.cli_owner("idle").await?,
        None,
        "broadcast or close claimed it"
    );
    let v = ok(
        &cluster,
        2,
        "POST",
        "/v1/documents/evented/events/whoami",
        Some(json!({})),
    )
    .await?;
    assert_eq!(v["reply_base64"], "bjM=", "{v}");
    let (st, _) = call(&cluster, 1, "DELETE", "/v1/documents/idle", None).await?;
    assert_eq!(st, 404);

    // a document nobody owns: claim=false refuses, otherwise the node asked claims it
    let (st, v) = call(&cluster, 1, "GET", "/v1/documents/fresh?claim=false", None).await?;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("not_owned")),
        "{v}"
    );
    assert_eq!(cluster.cli_owner("fresh").await?, None);
    ok(
        &cluster,
        1,
        "POST",
        "/v1/documents/fresh/ops",
        Some(json!({ "ops": [{ "op": "map.set", "type": "meta", "key": "k", "value": 1 }]})),
    )
    .await?;
    let v = ok(
        &cluster,
        2,
        "GET",
        "/v1/documents/fresh?types=meta:map",
        None,
    )
    .await?;
    assert_eq!(v["json"]["meta"]["k"], 1, "{v}");
    let (st, _) = call(&cluster, 0, "GET", "/v1/documents/never-written", None).await?;
    assert_eq!(st, 404);
    // delete through a third node, then it is gone
    let v = ok(&cluster, 0, "DELETE", "/v1/documents/fresh", None).await?;
    assert_eq!(v["deleted"], true, "{v}");
    let (st, _) = call(&cluster, 2, "GET", "/v1/documents/fresh", None).await?;
    assert_eq!(st, 404);

    // the CLI through n3's admin API
    let url = cluster.nodes[2].admin_url().unwrap_or_default();
    let env = [
        ("HEARTH_ADMIN_URL", url.as_str()),
        ("HEARTH_ADMIN_TOKEN", TOKEN),
    ];
    let run = cluster
        .cli_with(
            &["doc", "get", doc, "--types", "body:text"],
            &env,
            None,
            CLI_LIMIT,
        )
        .await?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("from n2"),
        "{run:?}"
    );
    let run = cluster
        .cli_with(
            &["doc", "apply", doc, "--append-text", "body", "!"],
            &env,
            None,
            CLI_LIMIT,
        )
        .await?;
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = cluster
        .cli_with(&["event", "fire", doc, "fail"], &env, None, CLI_LIMIT)
        .await?;
    assert_eq!(run.code, Some(6), "{run:?}");
    let run = cluster
        .cli_with(&["doc", "get", "never-written"], &env, None, CLI_LIMIT)
        .await?;
    assert_eq!(run.code, Some(3), "{run:?}");
    let run = cluster
        .cli_with(
            &["doc", "get", doc],
            &[
                ("HEARTH_ADMIN_URL", url.as_str()),
                ("HEARTH_ADMIN_TOKEN", "wrong-wrong-wrong-wrong"),
            ],
            None,
            CLI_LIMIT,
        )
        .await?;
    assert_eq!(run.code, Some(4), "{run:?}");
    let run = cluster
        .cli_with(
            &["doc", "apply", doc, "--ops", "{not json"],
            &env,
            None,
            CLI_LIMIT,
        )
        .await?;
    assert_eq!(run.code, Some(64), "{run:?}");
    let run = cluster
        .cli_with(&["cluster", "owner", doc], &env, None, CLI_LIMIT)
        .await?;
    assert_eq!(
        (
            run.code,
            String::from_utf8_lossy(&run.stdout).trim().to_owned()
        ),
        (Some(0), "n1".to_owned()),
        "{run:?}"
    );
    let run = cluster
        .cli_with(&["cluster", "status"], &env, None, CLI_LIMIT)
        .await?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).lines().count(),
        3,
        "{run:?}"
    );

    // close through n2: the owner's client gets Hocuspocus's reset
    let v = ok(
        &cluster,
        1,
        "POST",
        "/v1/documents/shared/close",
        Some(json!({})),
    )
    .await?;
    assert_eq!(v["connections"], 2, "{v}");
    for (c, at) in [(&on_n1, "n1"), (&on_n2, "n2")] {
        c.wait_for(
            &format!("the document closed with a reset on {at}"),
            WAIT,
            |s| s.doc_closed() == Some("Reset Connection"),
        )
        .await?;
    }

    // drain n3 through n1: its client moves away, its documents are handed over, it stays up
    let on_n3 = TestClient::connect(&cluster.nodes[2].url(), "on-n3", "").await?;
    on_n3.insert("before-drain");
    on_n3.wait_for("acked", WAIT, |s| s.all_acked()).await?;
    let (st, v) = call(&cluster, 0, "POST", "/v1/nodes/n3/drain", Some(json!({}))).await?;
    assert_eq!((st, &v["draining"]), (202, &json!(true)), "{v}");
    wait_until("n3 drained", WAIT, || async {
        let v = ok(&cluster, 2, "GET", "/v1/node", None).await?;
        let drained = v["draining"] == true && v["documents"] == 0;
        anyhow::Ok(drained.then_some(()).ok_or_else(|| v.to_string()))
    })
    .await?;
    assert_eq!(cluster.nodes[2].readyz().await?, 503);
    on_n3
        .wait_for("the client on n3 was let go", WAIT, |s| {
            s.doc_closed().is_some() || s.socket_close().is_some() || s.connects() >= 2
        })
        .await?;
    // the document is stored and served by another node
    let v = ok(
        &cluster,
        0,
        "GET",
        "/v1/documents/on-n3?types=log:array",
        None,
    )
    .await?;
    assert_eq!(v["json"]["log"], json!(["before-drain"]), "{v}");
    let owner = ok(&cluster, 0, "GET", "/v1/documents/on-n3/owner", None).await?;
    assert_ne!(owner["owner"], "n3", "{owner}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_never_hang() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_admin_timeouts")?;
    let mut cluster = Cluster::start(&scratch, spec()).await?;
    let doc = "paused";
    let _on_n1 = TestClient::connect(&cluster.nodes[0].url(), doc, "").await?;

    // 1,000 events in a row through a non-owner: nothing waits, nothing loads there
    for i in 0..1000 {
        let (st, v) = call(
            &cluster,
            1,
            "POST",
            "/v1/documents/paused/events/whoami",
            Some(json!({})),
        )
        .await?;
        anyhow::ensure!(st == 200, "event {i}: {st} {v}");
    }
    let m = cluster.metrics(1).await?;
    assert_eq!(m.sum("hearth_cluster_events_waiting", &[]), 0.0);
    assert_eq!(m.sum("hearth_documents_loaded", &[]), 0.0);

    // the owner frozen: a timeout within the deadline
    cluster.nodes[0].stop()?;
    let start = Instant::now();
    let (st, v) = call(
        &cluster,
        1,
        "POST",
        "/v1/documents/paused/events/whoami?timeout_ms=1000",
        Some(json!({})),
    )
    .await?;
    let took = start.elapsed();
    cluster.nodes[0].cont()?;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{v}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let m = cluster.metrics(1).await?;
    assert_eq!(m.sum("hearth_cluster_events_waiting", &[]), 0.0);

    // the owner killed: an answer within the deadline, never a hang
    cluster.nodes[0].kill()?;
    let start = Instant::now();
    let (st, v) = call(
        &cluster,
        2,
        "POST",
        "/v1/documents/paused/events/whoami?timeout_ms=2000",
        Some(json!({})),
    )
    .await?;
    let took = start.elapsed();
    assert!(matches!(st, 200 | 503 | 504), "{st} {v}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    Ok(())
}

/// Runs a Node.js script from the workspace with `env`, bounded by `limit`.
async fn node_script(
    script: &str,
    env: &[(&str, String)],
    limit: Duration,
) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(workspace_dir().join(script))
        .current_dir(workspace_dir())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(tokio::time::timeout(limit, cmd.output()).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_inserts_while_providers_edit() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_admin_stream")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let admins: Vec<String> = cluster.nodes.iter().filter_map(|n| n.admin_url()).collect();
    let out = node_script(
        "tests/interop/admin-stream.mjs",
        &[
            ("HEARTH_URLS", urls.join(",")),
            ("HEARTH_URL", urls[0].clone()),
            ("HEARTH_ADMIN_URLS", admins.join(",")),
            ("HEARTH_ADMIN_TOKEN", TOKEN.to_owned()),
            ("DOC", "streamed".to_owned()),
            ("INSERTS", "2000".to_owned()),
            ("CLIENTS", "20".to_owned()),
        ],
        Duration::from_secs(240),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    // the stored document (PostgreSQL) holds every insert
    wait_until("every insert stored", WAIT, || async {
        let blobs = cluster.stored_blobs("streamed")?;
        let doc = yrs::Doc::new();
        {
            use yrs::Transact as _;
            use yrs::updates::decoder::Decode as _;
            let mut txn = doc.transact_mut();
            for b in &blobs {
                txn.apply_update(yrs::Update::decode_v1(b)?)?;
            }
        }
        let text = {
            use yrs::{GetString as _, Transact as _};
            let t = doc.get_or_insert_text("content");
            t.get_string(&doc.transact())
        };
        let missing = (0..2000)
            .filter(|i| !text.contains(&format!("<{i}>")))
            .count();
        anyhow::Ok(
            (missing == 0)
                .then_some(())
                .ok_or_else(|| format!("{missing} missing")),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_run_against_the_cluster() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_admin_examples")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let _client = TestClient::connect(&cluster.nodes[0].url(), "example-doc", "").await?;
    let url = cluster.nodes[1].admin_url().unwrap_or_default();
    let env = [
        ("HEARTH_ADMIN_URL", url.clone()),
        ("HEARTH_ADMIN_TOKEN", TOKEN.to_owned()),
        ("EVENT", "whoami".to_owned()),
        ("STREAM_COUNT", "20".to_owned()),
    ];
    let out = node_script("examples/admin/admin.mjs", &env, Duration::from_secs(60)).await?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(workspace_dir().join("examples/admin/admin.py"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // both streamed their text into the document
    let v = ok(
        &cluster,
        2,
        "GET",
        "/v1/documents/example-doc?include=json&types=content:text",
        None,
    )
    .await?;
    let text = v["json"]["content"].as_str().unwrap_or_default().to_owned();
    assert!(text.len() > 20, "{v}");
    Ok(())
}
