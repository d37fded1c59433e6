//! Custom events from outside the cluster: `hearth cluster emit <doc> <event> [--payload P|-]`
//! (docs/cluster.md "Custom events from scripts").
//!
//! Nodes run `hearth-test-server`, whose `on_custom_event` answers `whoami` (the node id),
//! `append` (pushes the payload onto the `log` array, the test client's marker array, through a
//! direct connection, then replies with the node id), `slow` (sleeps for the payload's number of
//! milliseconds) and `fail` (the handler rejects).
//!
//! * `emit_reaches_the_owner_from_a_non_owner`: the CLI, configured like n2 while n1 owns the
//!   document, reaches n1 (reply `n1`, which is also what `hearth cluster owner` says); an
//!   `append` is seen by clients on n1 and n2 and by a fresh client on n3, and is stored; the
//!   payload can come from stdin; an unknown event and a failing handler exit 1 at once (not a
//!   timeout), and none of it moves ownership.
//! * `emit_to_an_unowned_document_exits_1_and_claims_nothing`: exit 1, nothing claimed or loaded;
//!   a payload too big for an envelope also exits 1, before anything is sent.
//! * `a_slow_handler_times_out_with_exit_2`: with `HEARTH_CUSTOM_EVENT_TTL_MS=1000`, a handler
//!   sleeping 5 s makes the CLI exit 2 after the TTL (not before, and not much later); the same
//!   handler sleeping 100 ms answers.
//! * `with_a_cluster_secret_a_wrong_or_missing_secret_has_no_effect`: the CLI with the cluster's
//!   secret appends, and so does one in the middle of a rotation (the cluster's secret current,
//!   a new one previous); with a wrong secret the CLI compares the owner's published secret
//!   fingerprints, exits 1 at once with one line naming `cluster_secret`, and sends nothing
//!   (no `bad_mac` on the owner), as it does with the new secret current and the cluster's
//!   previous (the owner would not accept it); with none, or a placeholder, the CLI refuses to
//!   start (exit 64, naming `cluster_secret`) and sends nothing; a node started with a wrong
//!   secret logs a warning naming the live nodes; the markers appear nowhere.

use std::time::Duration;

use cluster_tests::testbed::node::{NodeProcess, NodeSpec};
use cluster_tests::testbed::{
    CliRun, ClientOptions, Cluster, ClusterSpec, Scratch, TestClient, WAIT, marker_hits,
    random_secret, wait_until,
};

/// Bound on one CLI run (its own timeouts are shorter).
const CLI_LIMIT: Duration = Duration::from_secs(20);
const REJECTED: &str = "hearth_cluster_envelopes_rejected_total";

fn spec() -> ClusterSpec {
    ClusterSpec::new(3).binary(env!("CARGO_BIN_EXE_hearth-test-server"))
}

/// `hearth cluster emit doc event [--payload p]` with `env`.
async fn emit(
    cluster: &Cluster,
    doc: &str,
    event: &str,
    payload: Option<&str>,
    env: &[(&str, &str)],
) -> anyhow::Result<CliRun> {
    let mut args = vec!["cluster", "emit", doc, event];
    if let Some(p) = payload {
        args.extend(["--payload", p]);
    }
    cluster.cli_with(&args, env, None, CLI_LIMIT).await
}

fn stdout(run: &CliRun) -> String {
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// Waits (≤ `WAIT`) until the stored blobs of `doc` hold `marker`.
async fn wait_stored(cluster: &Cluster, doc: &str, marker: &str) -> anyhow::Result<()> {
    wait_until(&format!("{marker:?} stored for {doc}"), WAIT, || async {
        let hits: usize = cluster
            .stored_blobs(doc)?
            .iter()
            .map(|b| marker_hits(b, marker))
            .sum();
        anyhow::Ok(hits > 0)
    })
    .await
}

async fn wait_has(client: &TestClient, who: &str, marker: &str) -> anyhow::Result<()> {
    client
        .wait_for(&format!("{marker:?} at {who}"), WAIT, |s| {
            s.contents().iter().any(|m| m == marker)
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_reaches_the_owner_from_a_non_owner() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_custom_events_owner")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let doc = "events";
    let on_n1 =
        TestClient::connect_with(&cluster.nodes[0].url(), doc, ClientOptions::labelled("a"))
            .await?;
    let on_n2 =
        TestClient::connect_with(&cluster.nodes[1].url(), doc, ClientOptions::labelled("b"))
            .await?;
    assert_eq!(cluster.cli_owner(doc).await?.as_deref(), Some("n1"));
    // The CLI gets n2's configuration: its node id must not matter.
    let as_n2 = [("HEARTH_NODE_ID", "n2")];

    let who = emit(&cluster, doc, "whoami", None, &as_n2).await?;
    assert_eq!(who.code, Some(0), "{who:?}");
    assert_eq!(who.stdout, b"n1", "the reply, byte for byte");

    let appended = emit(&cluster, doc, "append", Some("cli:arg"), &as_n2).await?;
    assert_eq!(
        (appended.code, stdout(&appended)),
        (Some(0), "n1".into()),
        "{appended:?}"
    );
    wait_has(&on_n2, "the client on n2", "cli:arg").await?;
    wait_has(&on_n1, "the client on n1", "cli:arg").await?;
    wait_stored(&cluster, doc, "cli:arg").await?;

    let from_stdin = cluster
        .cli_with(
            &["cluster", "emit", doc, "append", "--payload", "-"],
            &as_n2,
            Some(b"cli:stdin"),
            CLI_LIMIT,
        )
        .await?;
    assert_eq!(from_stdin.code, Some(0), "{from_stdin:?}");
    wait_has(&on_n2, "the client on n2", "cli:stdin").await?;
    wait_stored(&cluster, doc, "cli:stdin").await?;
    let fresh = TestClient::connect(&cluster.nodes[2].url(), doc, "").await?;
    let contents = fresh.contents();
    for m in ["cli:arg", "cli:stdin"] {
        assert!(
            contents.iter().any(|c| c == m),
            "fresh client on n3 lacks {m}: {contents:?}"
        );
    }

    // Definitive failures exit 1 and do not wait for the TTL (30 s by default).
    let unknown = emit(&cluster, doc, "no-such-event", None, &as_n2).await?;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.stderr.contains("no handler"), "{unknown:?}");
    assert!(unknown.stdout.is_empty(), "{unknown:?}");
    let failed = emit(&cluster, doc, "fail", None, &as_n2).await?;
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert!(failed.stderr.contains("failed-on-purpose"), "{failed:?}");
    for run in [&unknown, &failed] {
        assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
    }

    assert_eq!(
        cluster.cli_owner(doc).await?.as_deref(),
        Some("n1"),
        "ownership moved"
    );
    for c in [&on_n1, &on_n2, &fresh] {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_to_an_unowned_document_exits_1_and_claims_nothing() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_custom_events_unowned")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let doc = "nobody-opened-this";
    let run = emit(&cluster, doc, "append", Some("cli:unowned"), &[]).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("no node owns"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert_eq!(
        cluster.cli_owner(doc).await?,
        None,
        "the emit claimed the document"
    );
    for (i, owned) in cluster.owned_all().await.into_iter().enumerate() {
        let owned = owned?;
        assert!(!owned.contains(doc), "n{} serves {doc}: {owned:?}", i + 1);
    }
    assert!(
        !cluster.epochs()?.contains_key(doc),
        "the emit loaded {doc} somewhere"
    );

    // A payload that cannot fit in an envelope is refused before anything is sent (exit 1).
    let owned = "owned-events";
    let _client = TestClient::connect(&cluster.nodes[0].url(), owned, "").await?;
    let big = vec![b'x'; (1 << 20) + 1];
    let run = cluster
        .cli_with(
            &["cluster", "emit", owned, "append", "--payload", "-"],
            &[("HEARTH_MAX_MESSAGE_BYTES", "1024")],
            Some(&big),
            CLI_LIMIT,
        )
        .await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("limit"), "{run:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_times_out_with_exit_2() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_custom_events_timeout")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let doc = "slow-events";
    let _owner = TestClient::connect(&cluster.nodes[0].url(), doc, "").await?;
    let ttl = Duration::from_millis(1000);
    let short = [("HEARTH_CUSTOM_EVENT_TTL_MS", "1000")];

    // Control: a handler that answers within the TTL.
    let quick = emit(&cluster, doc, "slow", Some("100"), &short).await?;
    assert_eq!(
        (quick.code, stdout(&quick)),
        (Some(0), "n1".into()),
        "{quick:?}"
    );

    let slow = emit(&cluster, doc, "slow", Some("5000"), &short).await?;
    assert_eq!(slow.code, Some(2), "{slow:?}");
    assert!(slow.stderr.contains("timed out"), "{slow:?}");
    assert!(slow.stdout.is_empty(), "{slow:?}");
    assert!(slow.elapsed >= ttl, "gave up before the TTL: {slow:?}");
    assert!(
        slow.elapsed < ttl + Duration::from_millis(2500),
        "took far longer than the TTL: {slow:?}"
    );
    eprintln!(
        "[cluster_custom_events] ttl {ttl:?}: timed out after {:?} (whole process)",
        slow.elapsed
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_secret_a_wrong_or_missing_secret_has_no_effect() -> anyhow::Result<()> {
    let scratch = Scratch::new("cluster_custom_events_secret")?;
    let cluster = Cluster::start(&scratch, spec()).await?;
    let doc = "guarded-events";
    let on_n1 =
        TestClient::connect_with(&cluster.nodes[0].url(), doc, ClientOptions::labelled("a"))
            .await?;
    let on_n2 =
        TestClient::connect_with(&cluster.nodes[1].url(), doc, ClientOptions::labelled("b"))
            .await?;
    assert_eq!(cluster.cli_owner(doc).await?.as_deref(), Some("n1"));
    let ttl = [("HEARTH_CUSTOM_EVENT_TTL_MS", "1000")];

    // Control: the cluster's own secret (which `cli_with` passes) works.
    let signed = emit(&cluster, doc, "append", Some("cli:signed-1"), &ttl).await?;
    assert_eq!(
        (signed.code, stdout(&signed)),
        (Some(0), "n1".into()),
        "{signed:?}"
    );
    wait_has(&on_n2, "the client on n2", "cli:signed-1").await?;

    // Rotation: the cluster's secret current and a new one previous still works.
    let new_secret = random_secret();
    let rotating = emit(
        &cluster,
        doc,
        "append",
        Some("cli:rotating"),
        &[ttl[0], ("HEARTH_CLUSTER_SECRET_PREVIOUS", &new_secret)],
    )
    .await?;
    assert_eq!(
        (rotating.code, stdout(&rotating)),
        (Some(0), "n1".into()),
        "{rotating:?}"
    );

    // A strong secret that is not the cluster's, or a swap the nodes have not made yet: found
    // out from the owner's published fingerprints, nothing sent, definitive.
    let forged_secret = random_secret();
    let before = cluster.metrics(0).await?.sum(REJECTED, &[]);
    for (what, env) in [
        (
            "wrong secret",
            vec![("HEARTH_CLUSTER_SECRET", forged_secret.as_str())],
        ),
        (
            "swapped too early",
            vec![
                ("HEARTH_CLUSTER_SECRET", new_secret.as_str()),
                ("HEARTH_CLUSTER_SECRET_PREVIOUS", cluster.secret()),
            ],
        ),
    ] {
        let mut env = env;
        env.push(ttl[0]);
        let run = emit(&cluster, doc, "append", Some("cli:forged"), &env).await?;
        assert_eq!(run.code, Some(1), "{what}: {run:?}");
        let line = run.stderr.trim();
        assert!(
            line.contains("cluster_secret")
                && line.contains("does not match the live nodes' secret")
                && !line.contains('\n'),
            "{what}: one line naming the setting: {run:?}"
        );
        assert!(!line.contains(&forged_secret) && !line.contains(&new_secret));
        assert!(
            run.elapsed < Duration::from_secs(2),
            "{what}: at once, not after the TTL: {run:?}"
        );
    }
    assert_eq!(
        cluster.metrics(0).await?.sum(REJECTED, &[]),
        before,
        "nothing was sent with the wrong secret"
    );

    // A node joining with a wrong secret says so in its log.
    let stranger = NodeProcess::start(
        &scratch,
        NodeSpec::new("n9", cluster.db.url())
            .env("HEARTH_REDIS_URL", cluster.redis().url())
            .env("HEARTH_REDIS_PREFIX", cluster.prefix())
            .env("HEARTH_CLUSTER_SECRET", forged_secret.as_str()),
    )
    .await?;
    let log = std::fs::read_to_string(stranger.log_path())?;
    let warning = log
        .lines()
        .find(|l| l.contains("does not match the live nodes' secret"))
        .unwrap_or_default();
    for node in ["n1", "n2", "n3"] {
        assert!(warning.contains(node), "names {node}: {log}");
    }
    drop(stranger);

    // No secret, or a placeholder: the CLI refuses to start, and sends nothing.
    for (what, value) in [
        ("no secret", ""),
        ("a placeholder", "change-me-1234567890123456789012"),
        ("a short secret", "Xk3-q9Lm2Vz8"),
    ] {
        let run = emit(
            &cluster,
            doc,
            "append",
            Some("cli:unsigned"),
            &[ttl[0], ("HEARTH_CLUSTER_SECRET", value)],
        )
        .await?;
        assert_eq!(run.code, Some(64), "{what}: {run:?}");
        let line = run.stderr.trim();
        assert!(
            line.contains("invalid setting cluster_secret") && !line.contains('\n'),
            "{what}: one line naming the setting: {run:?}"
        );
        if !value.is_empty() {
            assert!(!line.contains(value), "{what}: the error quotes the secret");
        }
        assert!(
            run.elapsed < Duration::from_secs(2),
            "{what}: refused at once, not after a timeout: {run:?}"
        );
    }
    assert_eq!(
        cluster.metrics(0).await?.sum(REJECTED, &[]),
        before,
        "nothing with a wrong secret reached n1"
    );

    // A later authentic append arrives; the rejected ones never do.
    let signed = emit(&cluster, doc, "append", Some("cli:signed-2"), &ttl).await?;
    assert_eq!(signed.code, Some(0), "{signed:?}");
    for (who, c) in [("n1", &on_n1), ("n2", &on_n2)] {
        wait_has(c, who, "cli:signed-2").await?;
    }
    wait_stored(&cluster, doc, "cli:signed-2").await?;
    let fresh = TestClient::connect(&cluster.nodes[2].url(), doc, "").await?;
    let stored = cluster.stored_blobs(doc)?;
    for marker in ["cli:forged", "cli:unsigned"] {
        for (who, c) in [("n1", &on_n1), ("n2", &on_n2), ("fresh on n3", &fresh)] {
            assert!(
                !c.contents().iter().any(|m| m == marker),
                "{marker} reached the client on {who}"
            );
        }
        let hits: usize = stored.iter().map(|b| marker_hits(b, marker)).sum();
        assert_eq!(hits, 0, "{marker} was stored");
    }
    Ok(())
}

/// Every `emit` run is a fresh identity; the owner keeps link state (sequence numbers, last
/// heard) per identity, and must drop it once the caller cannot send again (twice the custom
/// event TTL), or it would grow with every script run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_callers_are_forgotten_by_the_owner() -> anyhow::Result<()> {
    const PEERS: &str = "hearth_cluster_known_peers";
    let scratch = Scratch::new("cluster_custom_events_forget")?;
    let cluster = Cluster::start(
        &scratch,
        spec()
            .env("HEARTH_CUSTOM_EVENT_TTL_MS", "3000")
            .lock_ttl_ms(1500),
    )
    .await?;
    let doc = "forget-events";
    let _owner = TestClient::connect(&cluster.nodes[0].url(), doc, "").await?;
    let short = [("HEARTH_CUSTOM_EVENT_TTL_MS", "3000")];
    for _ in 0..3 {
        let who = emit(&cluster, doc, "whoami", None, &short).await?;
        assert_eq!((who.code, stdout(&who)), (Some(0), "n1".into()), "{who:?}");
    }
    // n1 knows the three callers (and any of n2/n3 it heard from) right after the runs...
    let after = cluster.metrics(0).await?.sum(PEERS, &[]);
    assert!(after >= 3.0, "n1 knows {after} peers after 3 emits");
    // ...and only the nodes once 2 × 3 s have passed (housekeeping runs every 0.5 s here)
    let limit = Duration::from_secs(15);
    let peers = wait_until("n1 forgetting the callers", limit, || async {
        let peers = cluster.metrics(0).await?.sum(PEERS, &[]);
        anyhow::Ok(if peers <= 2.0 {
            Ok(peers)
        } else {
            Err(format!("{peers} peers"))
        })
    })
    .await?;
    eprintln!("[cluster_custom_events] n1 peers: {after} after the emits, {peers} later");
    // the owner still answers new callers
    let who = emit(&cluster, doc, "whoami", None, &short).await?;
    assert_eq!(who.code, Some(0), "{who:?}");
    Ok(())
}
