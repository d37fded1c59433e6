//! The editor demo (`examples/editor/`) in a real browser against a cluster.
//!
//! Three nodes on PostgreSQL and Redis behind the round-robin balancer; the demo is built
//! (`npm run build`, esbuild) and served by its own static server; `examples/editor/test/
//! two-pages.mjs` drives Debian's Chromium through `playwright-core` with two pages, Alice and
//! Bob, both pointed at the balancer. This test and the script step through it together:
//!
//! 1. Alice's page connects. Her connection is the only one the balancer holds, so its backend
//!    is her node; that node owns the document (admin API `GET /v1/documents/{name}/owner` and
//!    the Redis lock agree).
//! 2. Bob's page connects and lands on another node (the balancer's next backend), which
//!    proxies him to the owner (`/cluster/owned` lists the document on the owner only). Each
//!    types a line; both editors show the same text and each other's caret and name.
//! 3. The owner is SIGKILLed. Both type a line while it is down. Alice's page reconnects
//!    through the balancer (its connection count goes up); Bob's stays (or becomes) connected;
//!    both type once more and end with the same text holding every line once, all
//!    acknowledged, each other's caret shown again.
//! 4. With both pages still open, a survivor owns the document, and the text it serves (admin
//!    API, ProseMirror JSON) is the text both pages show.
//!
//! Needs `/usr/bin/chromium` and `npm ci --prefix examples/editor` (`scripts/test` installs
//! both). On failure the script's transcript (page states, console output, page text), the
//! screenshots' paths and the nodes' last log lines are in the error.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use cluster_tests::testbed::{Cluster, ClusterSpec, Scratch, tail, workspace_dir};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{Instant, timeout};

const CHROMIUM: &str = "/usr/bin/chromium";
const ADMIN_TOKEN: &str = "Rz6Kb1Qm8Wx3Tv5Lc9Hn2Jd7P";
const DOC: &str = "browser-editor";
/// Bound for `npm run build`.
const BUILD_LIMIT: Duration = Duration::from_secs(180);
/// Bound for the whole browser script (it has its own, shorter, hard timeout).
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_on_different_nodes_survive_the_owner_kill() -> anyhow::Result<()> {
    let test = "browser_editor";
    let scratch = Scratch::new(test)?;
    let demo = workspace_dir().join("examples").join("editor");
    ensure!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: apt-get install chromium (scripts/test does)"
    );
    ensure!(
        demo.join("node_modules/playwright-core").is_dir(),
        "the demo's npm packages are missing: npm ci --prefix examples/editor (scripts/test does)"
    );
    build(&demo).await?;

    let spec = ClusterSpec::new(3)
        .lock_ttl_ms(2000)
        .env("HEARTH_ADMIN_TOKENS", ADMIN_TOKEN);
    let mut cluster = Cluster::start(&scratch, spec).await?;
    let (_server, editor_url) = serve(&demo).await?;

    let mut script = Command::new("node");
    script
        .arg(demo.join("test/two-pages.mjs"))
        .env("EDITOR_URL", &editor_url)
        .env("HEARTH_URL", cluster.lb.url())
        .env("DOC", DOC)
        .env("CHROMIUM", CHROMIUM)
        .env("ARTIFACTS", scratch.join("screenshots"))
        .env("SCRIPT_TIMEOUT_MS", "240000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(scratch.join("script.stderr"))?)
        .kill_on_drop(true);
    let mut child = script.spawn().context("starting node")?;
    let mut run = ScriptRun {
        stdin: Some(child.stdin.take().context("no stdin")?),
        stdout: BufReader::new(child.stdout.take().context("no stdout")?).lines(),
        transcript: String::new(),
        deadline: Instant::now() + SCRIPT_LIMIT,
    };

    let outcome = drive(&mut cluster, &mut run, &mut child).await;
    if let Err(e) = outcome {
        // a script waiting for an answer takes the closed input as a failure; either way it
        // prints its diagnostics (page states, text, screenshots) and exits
        run.stdin = None;
        let _ = run.rest(Duration::from_secs(45)).await;
        let _ = child.start_kill();
        let mut logs = String::new();
        for node in &cluster.nodes {
            logs += &format!(
                "\n--- last lines of node {} ({}) ---\n{}",
                node.id(),
                node.log_path().display(),
                tail(node.log_path(), 25)
            );
        }
        bail!(
            "{e:#}\n--- browser script output ---\n{}\n--- its stderr ---\n{}{logs}",
            run.transcript,
            tail(&scratch.join("script.stderr"), 40)
        );
    }
    eprintln!("--- browser script output ---\n{}", run.transcript);
    Ok(())
}

/// Steps through the script's handshakes (see the module docs).
async fn drive(
    cluster: &mut Cluster,
    run: &mut ScriptRun,
    child: &mut Child,
) -> anyhow::Result<()> {
    // 1. Alice alone: her node owns the document.
    run.expect("ALICE-CONNECTED").await?;
    let alice = only_new_backend(cluster, &[])?;
    let owner = owner_via_admin(cluster).await?;
    let holder = cluster.holder(DOC).await?.map(|h| h.node);
    let alice_id = cluster.nodes[alice].id().to_string();
    ensure!(
        owner.as_deref() == Some(alice_id.as_str()) && holder == owner,
        "Alice is on {alice_id}, but the admin API names owner {owner:?} and the lock {holder:?}"
    );
    run.send("OPEN-BOB").await?;

    // 2. Bob on another node, proxied to Alice's.
    run.expect("READY").await?;
    let bob = only_new_backend(cluster, &[alice])?;
    let bob_id = cluster.nodes[bob].id().to_string();
    ensure!(
        cluster.owned(alice).await?.contains(DOC) && !cluster.owned(bob).await?.contains(DOC),
        "{alice_id} should serve {DOC:?} and {bob_id} proxy it"
    );
    ensure!(
        cluster.holder(DOC).await?.map(|h| h.node).as_deref() == Some(alice_id.as_str()),
        "the owner changed before the kill"
    );
    eprintln!("[browser_editor] Alice on {alice_id} (owner), Bob on {bob_id} (proxied)");

    // 3. Kill the owner.
    cluster.nodes[alice].kill()?;
    run.send("KILLED a").await?;
    let final_line = run.expect("FINAL ").await?;
    let shown: String = serde_json::from_str(&final_line).context("FINAL is not a JSON string")?;

    // 4. With both pages still open: a survivor owns the document and serves what they show.
    let survivor = (0..cluster.nodes.len())
        .find(|&i| i != alice)
        .context("no other node")?;
    let (status, owner) = admin(cluster, survivor, &format!("/v1/documents/{DOC}/owner")).await?;
    ensure!(
        status == 200 && owner["owner"].is_string() && owner["owner"] != alice_id.as_str(),
        "after the kill of {alice_id} the owner lookup answers {status} {owner}"
    );
    let path = format!("/v1/documents/{DOC}?include=json&types=default:xml");
    let (status, doc) = admin(cluster, survivor, &path).await?;
    ensure!(status == 200, "reading the document: {status} {doc}");
    let served = prosemirror_text(&doc["json"]["default"]);
    ensure!(
        served == shown,
        "the cluster serves {served:?}, the pages show {shown:?}"
    );
    eprintln!(
        "[browser_editor] {} owns the document after the kill and serves the {} lines both pages show",
        owner["owner"],
        served.lines().count()
    );
    run.send("DONE").await?;
    let status = timeout(run.remaining(), child.wait())
        .await
        .context("the script did not exit after DONE")??;
    ensure!(status.success(), "the script exited with {status}");
    Ok(())
}

/// The one backend that holds a connection now and is not in `known`; every backend in the
/// balancer holds at most one (one page each).
fn only_new_backend(cluster: &Cluster, known: &[usize]) -> anyhow::Result<usize> {
    let open = cluster.lb.open_connections();
    ensure!(
        open.len() == known.len() + 1 && open.iter().all(|(_, n)| *n == 1),
        "expected one connection on each of {} nodes, the balancer holds {open:?}",
        known.len() + 1
    );
    let mut new = Vec::new();
    for (addr, _) in &open {
        let i = cluster
            .nodes
            .iter()
            .position(|n| n.addr() == *addr)
            .with_context(|| format!("{addr} is no node"))?;
        if !known.contains(&i) {
            new.push(i);
        }
    }
    match new[..] {
        [i] => Ok(i),
        _ => bail!("the new page is not on a node of its own: {open:?}"),
    }
}

/// `GET path` on node `i`'s admin API: (status, JSON body).
async fn admin(cluster: &Cluster, i: usize, path: &str) -> anyhow::Result<(u16, Value)> {
    cluster.nodes[i]
        .admin_call(ADMIN_TOKEN, "GET", path, None)
        .await
}

/// The document's owner according to the admin API of the first node.
async fn owner_via_admin(cluster: &Cluster) -> anyhow::Result<Option<String>> {
    let (status, v) = admin(cluster, 0, &format!("/v1/documents/{DOC}/owner")).await?;
    ensure!(status == 200, "owner lookup: {status} {v}");
    Ok(v["owner"].as_str().map(str::to_string))
}

/// The text of a ProseMirror JSON document, one line per top-level block (as the script reads
/// it from the page).
fn prosemirror_text(doc: &Value) -> String {
    fn collect(node: &Value, out: &mut String) {
        if let Some(t) = node["text"].as_str() {
            out.push_str(t);
        }
        for child in node["content"].as_array().into_iter().flatten() {
            collect(child, out);
        }
    }
    let blocks = doc["content"].as_array().cloned().unwrap_or_default();
    let lines: Vec<String> = blocks
        .iter()
        .map(|b| {
            let mut s = String::new();
            collect(b, &mut s);
            s
        })
        .collect();
    lines.join("\n")
}

/// The browser script's pipes and everything it printed so far.
struct ScriptRun {
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    transcript: String,
    deadline: Instant,
}

impl ScriptRun {
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Reads lines until one starts with `prefix`; returns the rest of that line.
    async fn expect(&mut self, prefix: &str) -> anyhow::Result<String> {
        loop {
            let line = timeout(self.remaining(), self.stdout.next_line())
                .await
                .with_context(|| format!("no {prefix:?} from the script within {SCRIPT_LIMIT:?}"))?
                .context("reading the script's output")?;
            let Some(line) = line else {
                bail!("the script ended before {prefix:?}");
            };
            self.transcript.push_str(&line);
            self.transcript.push('\n');
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.to_string());
            }
        }
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the script's input is closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Reads what is left of the output (≤ `limit`).
    async fn rest(&mut self, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        while let Ok(Ok(Some(line))) = timeout(
            until.saturating_duration_since(Instant::now()),
            self.stdout.next_line(),
        )
        .await
        {
            self.transcript.push_str(&line);
            self.transcript.push('\n');
        }
        Ok(())
    }
}

/// `npm run build` in the demo (esbuild: `dist/editor.js`).
async fn build(demo: &Path) -> anyhow::Result<()> {
    let out = timeout(
        BUILD_LIMIT,
        Command::new("npm")
            .args(["run", "build", "--silent"])
            .current_dir(demo)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("npm run build took too long")?
    .context("running npm")?;
    ensure!(
        out.status.success() && demo.join("dist/editor.js").is_file(),
        "npm run build failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Starts `node server.mjs --port 0`; returns it (killed on drop) and its `http://` base URL.
async fn serve(demo: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new("node")
        .arg(demo.join("server.mjs"))
        .args(["--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the demo server")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let line = timeout(Duration::from_secs(20), lines.next_line())
        .await
        .context("the demo server printed no address within 20 s")??
        .context("the demo server exited")?;
    let url = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line from the demo server: {line:?}"))?
        .to_string();
    Ok((child, url))
}
