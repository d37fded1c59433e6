//! The shipped Grafana dashboard (deploy/grafana/hearth-dashboard.json) and Prometheus alerts
//! (deploy/prometheus/alerts.yml) name only metrics a real node exposes: a clustered node (a
//! private Redis) is started, given some traffic (a client that edits, one refused socket), and
//! every `hearth_*` / `process_*` name found in the two files must be a series family of its
//! `/metrics` (a histogram's `_bucket`, `_sum` and `_count` belong to its family).

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use cluster_tests::testbed::{
    NodeProcess, NodeSpec, RawSocket, RedisProcess, Scratch, TestClient, wait_until,
};

const SECRET: &str = "Jt6Wq2Xr9Lm4Vb8Zc1Kn5Hd3Fs7Yp0Ga-metrics";

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every identifier in `text` that starts with `hearth_` or `process_`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !word(bytes[j]))
                .unwrap_or(bytes.len());
            let w = &text[i..end];
            if w.starts_with("hearth_") || w.starts_with("process_") {
                out.insert(w.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The families a `/metrics` body exposes (from its samples), with each histogram's series
/// names (`_bucket`, `_sum`, `_count`) as well.
fn exposed(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_real_metrics() -> anyhow::Result<()> {
    let scratch = Scratch::new("deployment_metrics")?;
    let redis = RedisProcess::start(&scratch).await?;
    let db = format!("sqlite://{}", scratch.join("hearth.db").display());
    let spec = NodeSpec::new("m1", &db)
        .args(["--redis-url", &redis.url()])
        .env("HEARTH_CLUSTER_SECRET", SECRET);
    let node = NodeProcess::start(&scratch, spec).await?;

    // traffic: an edit acknowledged (storage, acks, locks, routes), a socket closed by the server
    let client = TestClient::connect(&node.url(), "metrics-doc", "").await?;
    client.insert("hello");
    client.wait_all_acked(Duration::from_secs(10)).await?;
    let raw = RawSocket::connect(&node.url()).await?;
    raw.send(Bytes::from_static(&[0xff, 0xff, 0xff]));
    wait_until(
        "the server closing the bad socket",
        Duration::from_secs(5),
        || async { anyhow::Ok(raw.closed().is_some()) },
    )
    .await?;

    let (status, body) = node.operator_get("/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let exposed = exposed(&body);

    let mut checked = 0;
    for file in [
        "deploy/grafana/hearth-dashboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let names = metric_names(&repo_file(file));
        anyhow::ensure!(!names.is_empty(), "{file} names no metric");
        let missing: Vec<&String> = names.iter().filter(|n| !exposed.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the node does not expose: {missing:?}\n/metrics:\n{body}"
        );
        checked += names.len();
    }
    eprintln!("{checked} metric names of the dashboard and the alerts found on a clustered node");
    drop(client);
    Ok(())
}

#[test]
fn the_name_scanner_finds_names() {
    let names = metric_names(
        r#"{"expr": "histogram_quantile(0.99, rate(hearth_ack_seconds_bucket[5m])) + process_open_fds / x_hearth_y"}"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["hearth_ack_seconds_bucket", "process_open_fds"]
    );
}
