//! Smoke runs of `hearth-bench` against a real `hearth` process at tiny sizes: every scenario
//! must talk to the server correctly (no missing deliveries, no protocol errors, sane output).
//! No timing assertions — these run on loaded CI machines.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use cluster_tests::testbed::{NodeProcess, NodeSpec, Scratch};
use serde_json::Value;

/// Runs the bench binary and returns its JSON lines (panics with its stderr on failure).
fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-bench"))
        .args(args)
        .arg("--quiet")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hearth-bench {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn result<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == kind).collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// The checks every fan-out-like window must pass.
fn assert_clean_window(w: &Value, peers_per_insert: u64) {
    assert_eq!(u(&w["missing"]), 0, "missing deliveries: {w}");
    assert_eq!(u(&w["errors"]), 0, "client errors: {w}");
    assert_eq!(u(&w["rejected"]), 0, "rejected updates: {w}");
    assert_eq!(u(&w["outstanding_acks"]), 0, "unacknowledged updates: {w}");
    let sent = u(&w["sent"]);
    assert!(sent > 0, "nothing sent: {w}");
    assert!(u(&w["ack_latency"]["count"]) > 0, "no ack latency: {w}");
    if peers_per_insert > 0 {
        assert!(u(&w["delivered"]) > 0, "nothing delivered: {w}");
        assert!(u(&w["latency"]["count"]) > 0, "no latency samples: {w}");
        // every insert in the window reached every other client of its document
        assert!(
            u(&w["latency"]["count"]) >= sent * peers_per_insert,
            "fewer samples than deliveries: {w}"
        );
    }
    assert!(
        w["server_cpu_s"].is_number(),
        "server CPU not measured: {w}"
    );
    assert!(
        w["bench_cpu_cores"].is_number(),
        "bench CPU not measured: {w}"
    );
}

/// A node on `db` with durable acknowledgements, and the runtime that drives its harness.
struct Server {
    runtime: tokio::runtime::Runtime,
    node: NodeProcess,
}

impl Server {
    fn start(scratch: &Scratch, db: &str) -> Server {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let spec = NodeSpec::new("bench", db).args(["--durability", "durable"]);
        let node = runtime.block_on(NodeProcess::start(scratch, spec)).unwrap();
        Server { runtime, node }
    }

    fn pid(&self) -> String {
        self.node.pid().unwrap().to_string()
    }

    fn url(&self) -> String {
        self.node.url()
    }

    /// SIGTERM; the node must exit cleanly.
    fn stop(mut self) {
        let status = self.runtime.block_on(self.node.term()).unwrap();
        assert!(status.success(), "hearth exited with {status}");
    }
}

#[test]
fn fanout_delivers_everything() {
    let scratch = Scratch::new("bench-smoke-fanout_delivers_everything").unwrap();
    let h = Server::start(&scratch, "memory://");
    let pid = h.pid();
    let lines = bench(&[
        "fanout",
        "--url",
        &h.url(),
        "--server-pid",
        &pid,
        "--docs",
        "2",
        "--clients",
        "3",
        "--rate",
        "20",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--label",
        "smoke",
    ]);
    let r = result(&lines, "result");
    assert_eq!(r.len(), 1, "{lines:?}");
    let w = r[0];
    assert_eq!(w["scenario"], "fanout");
    assert_eq!(w["label"], "smoke");
    assert_eq!(u(&w["clients"]), 6);
    assert_clean_window(w, 2);
    h.stop();
}

#[test]
fn maxrate_and_acklatency_step_through_rates() {
    let scratch = Scratch::new("bench-smoke-maxrate_and_acklatency_step_through_rates").unwrap();
    let h = Server::start(&scratch, "memory://");
    let pid = h.pid();
    let lines = bench(&[
        "maxrate",
        "--url",
        &h.url(),
        "--server-pid",
        &pid,
        "--docs",
        "2",
        "--clients",
        "2",
        "--start-rate",
        "20",
        "--factor",
        "2",
        "--max-steps",
        "2",
        "--refine",
        "0",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    let steps = result(&lines, "step");
    assert_eq!(steps.len(), 2, "{lines:?}");
    for s in &steps {
        assert_eq!(s["pass"], true, "a tiny rate failed: {s}");
        assert_clean_window(s, 1);
    }
    let r = result(&lines, "result");
    assert_eq!(r[0]["max_sustained_rate"].as_f64(), Some(40.0), "{lines:?}");

    let lines = bench(&[
        "acklatency",
        "--url",
        &h.url(),
        "--server-pid",
        &pid,
        "--docs",
        "3",
        "--clients",
        "1",
        "--rates",
        "10,30",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    let steps = result(&lines, "step");
    assert_eq!(steps.len(), 2, "{lines:?}");
    for s in steps {
        assert_clean_window(s, 0);
    }
    h.stop();
}

#[test]
fn conns_measures_rss_per_connection() {
    let scratch = Scratch::new("bench-smoke-conns_measures_rss_per_connection").unwrap();
    let h = Server::start(&scratch, "memory://");
    let pid = h.pid();
    let lines = bench(&[
        "conns",
        "--url",
        &h.url(),
        "--server-pid",
        &pid,
        "--conns",
        "50",
        "--docs",
        "5",
        "--settle",
        "0.2",
        "--hold",
        "0.5",
    ]);
    let r = result(&lines, "result");
    assert_eq!(r.len(), 1, "{lines:?}");
    assert_eq!(u(&r[0]["open"]), 50, "{r:?}");
    assert_eq!(u(&r[0]["failed"]), 0);
    assert_eq!(u(&r[0]["dropped_while_idle"]), 0);
    assert!(r[0]["rss_bytes_per_conn"].is_number(), "{r:?}");
    h.stop();
}

#[test]
fn coldload_reads_back_stored_documents() {
    let scratch = Scratch::new("bench-smoke-coldload").unwrap();
    let db = format!("sqlite://{}", scratch.join("hearth.db").display());
    let args = |phase: &str, h: &Server| {
        let pid = h.pid();
        bench(&[
            "coldload",
            "--url",
            &h.url(),
            "--server-pid",
            &pid,
            "--phase",
            phase,
            "--docs",
            "2",
            "--bytes",
            "30000",
            "--prefix",
            "smoke-cold",
            "--unload-wait",
            "0.1",
        ])
    };
    // seed, restart, measure: the real cold path, from SQLite
    let h = Server::start(&scratch, &db);
    let seeded = args("seed", &h);
    assert_eq!(result(&seeded, "seed").len(), 1, "{seeded:?}");
    h.stop();
    let h = Server::start(&scratch, &db);
    let lines = args("measure", &h);
    h.stop();
    let r = result(&lines, "result");
    assert_eq!(r.len(), 1, "{lines:?}");
    assert_eq!(u(&r[0]["content_mismatches"]), 0, "{r:?}");
    assert_eq!(u(&r[0]["cold"]["count"]), 2);
    assert_eq!(u(&r[0]["warm"]["count"]), 2);
    assert_eq!(u(&r[0]["hot"]["count"]), 2);
    assert!(u(&r[0]["doc_bytes"]) >= 30000);
}

#[test]
fn proxied_splits_latency_by_path() {
    let scratch = Scratch::new("bench-smoke-proxied_splits_latency_by_path").unwrap();
    let h = Server::start(&scratch, "memory://");
    let pid = h.pid();
    // one node behind three URLs; the owner command names the first as owner of every doc
    let url = h.url();
    let urls = format!("{url},{url}?n=2,{url}?n=3");
    let lines = bench(&[
        "proxied",
        "--url",
        &urls,
        "--server-pid",
        &pid,
        "--docs",
        "2",
        "--clients",
        "4",
        "--rate",
        "10",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--owner-cmd",
        "echo 0",
    ]);
    let r = result(&lines, "result");
    assert_eq!(r.len(), 1, "{lines:?}");
    let w = r[0];
    assert_eq!(w["owners_known"], true);
    // clients go round-robin over the URLs: doc 0 → 0,1,2,0; doc 1 → 1,2,0,1
    assert_eq!(u(&w["owner_clients"]), 3);
    assert_eq!(u(&w["proxied_clients"]), 5);
    assert_clean_window(w, 3);
    let paths = w["by_path"].as_object().unwrap();
    for p in [
        "local",
        "owner_to_proxied",
        "proxied_to_owner",
        "proxied_to_proxied",
    ] {
        assert!(paths.contains_key(p), "no {p} in {paths:?}");
    }
    h.stop();
}
