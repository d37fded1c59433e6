//! Authentication comes before any cluster work, and failed authentication is throttled across
//! the cluster (docs/cluster.md "Ownership timeline" step 1 and "Failed authentication across
//! nodes"; docs/configuration.md `auth_failures_before_ban`).
//!
//! Two nodes with the token table `good=read-write,*=deny`, a ban after 5 failures, and
//! 127.0.0.1 trusted as a proxy, so each raw client picks its client address with
//! `X-Forwarded-For` (clients without the header are 127.0.0.1 themselves).
//!
//! * An unauthenticated client on n2, which owns nothing, asks for 30 document names: 10 with a
//!   refused token (the first 5 refused by the hooks, the rest by the ban they caused) and 20 with
//!   only sync frames and no Auth. It gets `PermissionDenied` for the 10, and n2 does no Redis
//!   work for any of them: no lock key appears (`SCAN <prefix>:lock:*`), no route look-up or lock
//!   acquisition is counted.
//! * A flood of bad-token connections through n1 from another address bans it in Redis; n2,
//!   which had just let that address in (and so trusts "not banned" for up to a second),
//!   answers its upgrades 429 within about a second, and n1 its Auth frames on a still-open
//!   socket with `PermissionDenied`. The client banned on n2 is refused by n1 as well.
//! * Meanwhile a good client keeps editing a document owned by n1, and a good client that joins
//!   through n2 (proxied) sees every edit.

use std::collections::BTreeSet;
use std::time::Duration;

use cluster_tests::testbed::client::{ServerMsg, auth_frame};
use cluster_tests::testbed::raw::{step1, upgrade_status};
use cluster_tests::testbed::redis::Resp;
use cluster_tests::testbed::{
    ClientOptions, Cluster, ClusterSpec, RawSocket, Scratch, TestClient, WAIT, wait_until,
};
use tokio::time::Instant;

const FAILURES: usize = 5;
const PROBER: &str = "192.0.2.50";
const FLOODER: &str = "203.0.113.7";
const V: Option<&str> = Some("4.8.0");

/// Every key matching `pattern` (SCAN, so it works on a busy Redis too).
async fn keys(cluster: &Cluster, pattern: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut cursor = "0".to_string();
    let mut out = BTreeSet::new();
    loop {
        let reply = cluster
            .redis()
            .command(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"])
            .await?;
        let Resp::Array(Some(parts)) = reply else {
            anyhow::bail!("SCAN answered {reply:?}");
        };
        let (Some(next), Some(Resp::Array(Some(batch)))) = (parts.first(), parts.get(1)) else {
            anyhow::bail!("SCAN answered {parts:?}");
        };
        out.extend(batch.iter().filter_map(Resp::as_str));
        cursor = next.as_str().unwrap_or_default();
        if cursor == "0" {
            return Ok(out);
        }
    }
}

fn denied(m: &ServerMsg) -> bool {
    matches!(m, ServerMsg::PermissionDenied(r) if r == "permission-denied")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_cost_no_redis_work_and_a_ban_holds_on_every_node() -> anyhow::Result<()> {
    let test = "cluster_auth_throttle";
    let scratch = Scratch::new(test)?;
    let spec = ClusterSpec::new(2)
        .env("HEARTH_AUTH_TOKENS", "good=read-write,*=deny")
        .env("HEARTH_TRUSTED_PROXIES", "127.0.0.1")
        .env("HEARTH_AUTH_FAILURES_BEFORE_BAN", FAILURES.to_string())
        .env("HEARTH_AUTH_FAILURE_WINDOW_MS", "60000")
        .env("HEARTH_AUTH_BAN_MS", "60000");
    let cluster = Cluster::start(&scratch, spec).await?;
    let lock_pattern = format!("{}:lock:*", cluster.prefix());
    let (n1, n2) = (cluster.nodes[0].url(), cluster.nodes[1].url());
    let good = |label: &str| ClientOptions::labelled(label).token("good");

    // A good client edits `edited`, owned by n1.
    let editor = TestClient::connect_with(&n1, "edited", good("e")).await?;
    for _ in 0..3 {
        editor.insert_next();
    }
    editor.wait_all_acked(WAIT).await?;
    assert_eq!(
        keys(&cluster, &lock_pattern).await?,
        BTreeSet::from([cluster.lock_key("edited")])
    );
    let m2 = cluster.metrics(1).await?;
    let routes_before = m2.sum("hearth_cluster_route_lookups_total", &[]);
    let acquires_before = m2.sum("hearth_cluster_lock_ops_total", &[("op", "acquire")]);

    // --- an unauthenticated client on the non-owner n2: no Redis work at all ---
    let prober = RawSocket::connect_as(&n2, Some(PROBER)).await?;
    for i in 0..20 {
        prober.send(step1(&format!("no-auth-{i}")));
    }
    for i in 0..2 * FAILURES {
        let doc = format!("bad-token-{i}");
        prober.send(auth_frame(&doc, "bad", V));
        prober.send(step1(&doc));
        prober.wait_count(&doc, 1, WAIT, denied).await?;
    }
    prober.settle(Duration::from_millis(300), WAIT).await;
    assert_eq!(
        prober.closed(),
        None,
        "refused documents leave the socket open"
    );
    assert_eq!(
        keys(&cluster, &lock_pattern).await?,
        BTreeSet::from([cluster.lock_key("edited")]),
        "no lock key for any document the unauthenticated client named"
    );
    let m2 = cluster.metrics(1).await?;
    assert_eq!(
        m2.sum("hearth_cluster_route_lookups_total", &[]),
        routes_before,
        "n2 routed nothing for it"
    );
    assert_eq!(
        m2.sum("hearth_cluster_lock_ops_total", &[("op", "acquire")]),
        acquires_before,
        "n2 tried to claim nothing for it"
    );
    assert_eq!(m2.sum("hearth_auth_failures_total", &[]), FAILURES as f64);
    assert_eq!(m2.sum("hearth_auth_bans_total", &[]), 1.0);
    assert_eq!(
        m2.sum("hearth_auth_throttled_total", &[("at", "auth")]),
        FAILURES as f64,
        "after the ban, Auth frames are refused without hooks"
    );
    // that ban holds on n1 too
    assert_eq!(upgrade_status(&n1, Some(PROBER)).await?, 429);

    // --- a flood through n1 bans its address on n2 within about a second ---
    // n2 lets the flooder in first, so it trusts "not banned" for up to a second afterwards
    assert_eq!(upgrade_status(&n2, Some(FLOODER)).await?, 101);
    let held_open = RawSocket::connect_as(&n1, Some(FLOODER)).await?;
    let mut flood = Vec::new();
    for i in 0..FAILURES {
        let s = RawSocket::connect_as(&n1, Some(FLOODER)).await?;
        let doc = format!("flood-{i}");
        s.send(auth_frame(&doc, "bad", V));
        s.wait_count(&doc, 1, WAIT, denied).await?;
        flood.push(s);
    }
    let banned_at = Instant::now();
    let ban_key = format!("{}:authban:{{{FLOODER}}}", cluster.prefix());
    assert!(
        keys(&cluster, &ban_key).await?.contains(&ban_key),
        "the ban is in Redis"
    );
    let what = "n2 refusing the banned address";
    wait_until(what, Duration::from_secs(3), || async {
        match upgrade_status(&n2, Some(FLOODER)).await? {
            429 => anyhow::Ok(true),
            101 => Ok(false),
            other => anyhow::bail!("n2 answered {other}"),
        }
    })
    .await?;
    let on_n2 = banned_at.elapsed();
    assert!(
        on_n2 <= Duration::from_millis(1500),
        "the ban reached n2 after {on_n2:?}"
    );
    eprintln!("[{test}] the ban made on n1 holds on n2 after {on_n2:?}");
    assert_eq!(upgrade_status(&n1, Some(FLOODER)).await?, 429);
    // the flooder's open socket: even a good token is denied now
    held_open.send(auth_frame("edited", "good", V));
    held_open.wait_count("edited", 1, WAIT, denied).await?;
    let m1 = cluster.metrics(0).await?;
    assert_eq!(m1.sum("hearth_auth_bans_total", &[]), 1.0);
    assert!(m1.sum("hearth_auth_throttled_total", &[("at", "upgrade")]) >= 2.0);
    assert!(
        cluster
            .metrics(1)
            .await?
            .sum("hearth_auth_banned_addresses", &[])
            >= 2.0
    );

    // --- the good clients were never disturbed ---
    for _ in 0..3 {
        editor.insert_next();
    }
    editor.wait_all_acked(WAIT).await?;
    let reader = TestClient::connect_with(&n2, "edited", good("r")).await?;
    let expected = editor.contents();
    assert_eq!(expected.len(), 6);
    reader
        .wait_for("every edit, through n2", WAIT, |s| s.contents() == expected)
        .await?;
    let m = reader.insert_next();
    reader.wait_all_acked(WAIT).await?;
    editor
        .wait_for("the proxied reader's edit", WAIT, |s| {
            s.contents().contains(&m)
        })
        .await?;
    for c in [&editor, &reader] {
        let anomalies = c.view(|s| s.anomalies().to_vec());
        assert!(anomalies.is_empty(), "{anomalies:?}");
        assert!(c.view(|s| s.connected()), "a good client was disconnected");
    }
    drop(flood);
    Ok(())
}

/// Connection attempts are counted across the cluster: an address that upgrades more than
/// `max_connection_attempts_per_ip` times in the window, alternating between the nodes, is
/// banned on both at the attempt over the limit, while another address keeps connecting and a
/// good client keeps editing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_attempts_are_counted_across_nodes() -> anyhow::Result<()> {
    const ATTEMPTS: usize = 10;
    const STORMER: &str = "198.51.100.9";
    const NEIGHBOUR: &str = "198.51.100.10";
    let scratch = Scratch::new("cluster_connection_attempts")?;
    let spec = ClusterSpec::new(2)
        .env("HEARTH_AUTH_TOKENS", "good=read-write,*=deny")
        .env("HEARTH_TRUSTED_PROXIES", "127.0.0.1")
        .env(
            "HEARTH_MAX_CONNECTION_ATTEMPTS_PER_IP",
            ATTEMPTS.to_string(),
        )
        .env("HEARTH_CONNECTION_ATTEMPT_WINDOW_MS", "60000")
        .env("HEARTH_AUTH_BAN_MS", "60000");
    let cluster = Cluster::start(&scratch, spec).await?;
    let urls = [cluster.nodes[0].url(), cluster.nodes[1].url()];
    let editor = TestClient::connect_with(
        &urls[0],
        "attempts-edited",
        ClientOptions::labelled("e").token("good"),
    )
    .await?;
    for i in 0..ATTEMPTS {
        assert_eq!(
            upgrade_status(&urls[i % 2], Some(STORMER)).await?,
            101,
            "attempt {i} is within the limit"
        );
    }
    // one more, on either node, is refused, and then both refuse
    assert_eq!(upgrade_status(&urls[0], Some(STORMER)).await?, 429);
    // n2 trusts "not banned" for at most a second
    wait_until(
        "n2 refusing the banned address",
        Duration::from_secs(3),
        || async { anyhow::Ok(upgrade_status(&urls[1], Some(STORMER)).await? == 429) },
    )
    .await?;
    // others are not affected
    for url in &urls {
        assert_eq!(upgrade_status(url, Some(NEIGHBOUR)).await?, 101);
    }
    editor.insert_next();
    editor.wait_all_acked(WAIT).await?;
    Ok(())
}
