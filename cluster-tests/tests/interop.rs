//! Interop tests: the real npm clients (`@hocuspocus/provider` v4 / v3.4.4 / v2.15.3,
//! `y-websocket`, raw `ws` frames) against a real Hearth process: `hearth-test-server`, the stock
//! command line plus the test behaviours of `cluster_tests::test_extension`.
//!
//! Each `#[test]` starts its own server (`--listen 127.0.0.1:0 --database-url memory://`, short
//! auth/idle timeouts, `RUST_LOG=debug` into a log file), runs
//! `node tests/interop/<script>.mjs` with `HEARTH_URL` / `HEARTH_YWS_URL`, and asserts exit status
//! 0. On failure the script's output and the tail of the server log are printed; the scratch
//! directory (under `CARGO_TARGET_TMPDIR/interop/`) is kept for inspection.
//!
//! Prerequisite: Node.js >= 20 and `npm ci --prefix tests/interop` (see tests/interop/README.md).
//! The scenarios and the test behaviours are described in tests/interop/README.md.
//!
//! The server is started with the harness's node launcher (`cluster_tests::testbed`).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster_tests::testbed::{NodeProcess, NodeSpec};

/// Static token table of the test configuration (see tests/interop/README.md).
const AUTH_TOKENS: &str = "rw=read-write,ro=read-only,bad=deny,slow=read-write,*=deny";
/// Pre-auth deadline configured on the server (auth-timeout.mjs gets the same value).
const AUTH_TIMEOUT_MS: u64 = 2000;
/// Idle timeout configured on the server (idle.mjs observes for longer than this).
const IDLE_TIMEOUT_MS: u64 = 3000;
/// Path prefix of the plain y-websocket endpoint: `ws://ADDR/y/<room>`.
const YWS_PATH: &str = "/y";
/// Hard bound for one script run (each script also has its own internal hard timeout).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of the server log shown on failure.
const LOG_TAIL_BYTES: u64 = 48 * 1024;

/// Every script in tests/interop/scripts.json must have a test below (checked by
/// `every_script_has_a_test`).
const SCRIPTS: &[&str] = &[
    "convergence",
    "awareness",
    "bad-token",
    "read-only",
    "multiplex",
    "destroy-one",
    "stateless",
    "raw-frames",
    "raw-pong",
    "auth-timeout",
    "legacy-providers",
    "idle",
    "y-websocket",
    "load-failure",
    "server-reset",
    "direct-connection",
    "slow-auth",
    "persistence",
];

fn interop_dir() -> PathBuf {
    // the scripts and their npm clients live at the repository's tests/interop/
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("interop")
}

/// Kills (and reaps) the child process when dropped, so no server or node process outlives a
/// test, whether it passes, fails or panics.
struct KillOnDrop {
    child: Child,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `try_wait` until the child exits or `timeout` elapses (`None` = still running).
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child process {} failed: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(25));
    }
}

/// A fresh scratch directory per test run.
fn scratch_dir(script: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("interop")
        .join(format!(
            "{script}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create scratch dir {}: {e}", dir.display()));
    dir
}

/// The whole file if it is small, otherwise its last `max` bytes.
fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("<{} not readable>", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut prefix = String::new();
    if len > max {
        let _ = f.seek(SeekFrom::Start(len - max));
        prefix = format!(
            "<… {} earlier bytes omitted, see {}>\n",
            len - max,
            path.display()
        );
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    prefix + &String::from_utf8_lossy(&buf)
}

fn ensure_node_modules() {
    let dir = interop_dir();
    if !dir
        .join("node_modules")
        .join("@hocuspocus")
        .join("provider")
        .is_dir()
    {
        panic!(
            "\n{}/node_modules is missing.\n\
             The interop tests need Node.js >= 20 and the pinned npm clients. Install them with\n\n    \
             npm ci --prefix tests/interop\n\n\
             (from the repository root; see tests/interop/README.md), then rerun\n\n    \
             cargo test --test interop\n",
            dir.display()
        );
    }
}

struct Server {
    // Declared first so the process is killed before anything else is dropped.
    _node: NodeProcess,
    addr: SocketAddr,
    log: PathBuf,
}

/// Starts `hearth-test-server` (through the test harness's node launcher) on an ephemeral
/// loopback port, its log and ready files in `dir`, and waits (bounded) until it listens.
fn start_server(dir: &Path, extra_env: &[(&str, String)]) -> Server {
    let mut spec = NodeSpec::new("interop", "memory://")
        .env("HEARTH_AUTH_TOKENS", AUTH_TOKENS)
        .env("HEARTH_AUTH_TIMEOUT_MS", AUTH_TIMEOUT_MS.to_string())
        .env("HEARTH_IDLE_TIMEOUT_MS", IDLE_TIMEOUT_MS.to_string())
        .env("RUST_LOG", "debug");
    spec.bin = Some(PathBuf::from(env!("CARGO_BIN_EXE_hearth-test-server")));
    for (k, v) in extra_env {
        spec = spec.env(*k, v.clone());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the launcher");
    match runtime.block_on(NodeProcess::start_in(dir, spec)) {
        Ok(node) => Server {
            addr: node.addr(),
            log: node.log_path().to_path_buf(),
            _node: node,
        },
        Err(e) => panic!(
            "hearth-test-server did not start: {e:#}\n--- server log ---\n{}",
            read_tail(&dir.join("node-interop.log"), LOG_TAIL_BYTES)
        ),
    }
}

/// Runs one scenario script against a fresh server and asserts exit status 0.
fn run_script(script: &str, extra_env: &[(&str, String)]) {
    run_script_with(script, extra_env, &[], SCRIPT_TIMEOUT);
}

/// `run_script` with extra server environment and a custom timeout.
fn run_script_with(
    script: &str,
    extra_env: &[(&str, String)],
    server_env: &[(&str, String)],
    timeout: Duration,
) {
    ensure_node_modules();
    let dir = scratch_dir(script);
    let server = start_server(&dir, server_env);
    let hearth_url = format!("ws://{}", server.addr);
    let yws_url = format!("ws://{}{YWS_PATH}", server.addr);

    let out_path = dir.join("script.out");
    let out = File::create(&out_path).expect("create script output file");
    let err = out.try_clone().expect("clone script output file handle");
    let script_path = interop_dir().join(format!("{script}.mjs"));
    let node = std::env::var("HEARTH_INTEROP_NODE").unwrap_or_else(|_| "node".to_owned());
    let mut cmd = Command::new(&node);
    cmd.arg(&script_path)
        .current_dir(interop_dir())
        .env("HEARTH_URL", &hearth_url)
        .env("HEARTH_YWS_URL", &yws_url)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run `{node} {}` (is Node.js >= 20 installed?): {e}",
            script_path.display()
        )
    });
    let mut node_proc = KillOnDrop { child };
    let started = Instant::now();
    let status = wait_with_timeout(&mut node_proc.child, timeout);
    let elapsed = started.elapsed();
    drop(node_proc); // kills it if it is still running
    let output = read_tail(&out_path, 256 * 1024);
    let ok = matches!(status, Some(s) if s.success());

    if ok {
        println!("{script}.mjs passed in {elapsed:?} against {hearth_url}\n{output}");
        drop(server);
        let _ = fs::remove_dir_all(&dir);
        return;
    }
    let outcome = match status {
        Some(s) => format!("exited with {s}"),
        None => format!("did not finish within {timeout:?} and was killed"),
    };
    let log = server.log.clone();
    drop(server); // stop the server so its log is complete
    panic!(
        "\ninterop script {script}.mjs {outcome} (after {elapsed:?}; HEARTH_URL={hearth_url} HEARTH_YWS_URL={yws_url})\n\
         --- script output ---\n{output}\n\
         --- server log ({}) ---\n{}\n\
         --- scratch dir kept: {} ---\n",
        log.display(),
        read_tail(&log, LOG_TAIL_BYTES),
        dir.display()
    );
}

fn idle_observe_ms() -> String {
    std::env::var("IDLE_OBSERVE_MS").unwrap_or_else(|_| "10000".to_owned())
}

#[test]
fn every_script_has_a_test() {
    let path = interop_dir().join("scripts.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let listed: Vec<&str> = text
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    let mut sorted_listed = listed.clone();
    sorted_listed.sort_unstable();
    let mut sorted_tests = SCRIPTS.to_vec();
    sorted_tests.sort_unstable();
    assert_eq!(
        sorted_listed, sorted_tests,
        "tests/interop/scripts.json and SCRIPTS in tests/interop.rs differ"
    );
    for s in SCRIPTS {
        let p = interop_dir().join(format!("{s}.mjs"));
        assert!(p.is_file(), "{} is missing", p.display());
    }
}

#[test]
fn convergence() {
    run_script("convergence", &[]);
}

#[test]
fn awareness() {
    run_script("awareness", &[]);
}

#[test]
fn bad_token() {
    run_script("bad-token", &[]);
}

#[test]
fn read_only() {
    run_script("read-only", &[]);
}

#[test]
fn multiplex() {
    run_script("multiplex", &[]);
}

#[test]
fn destroy_one() {
    run_script("destroy-one", &[]);
}

#[test]
fn stateless() {
    run_script("stateless", &[]);
}

#[test]
fn raw_frames() {
    run_script("raw-frames", &[]);
}

#[test]
fn raw_pong() {
    run_script("raw-pong", &[("PONG_EXPECT", "accept".to_owned())]);
}

#[test]
fn auth_timeout() {
    run_script(
        "auth-timeout",
        &[("AUTH_TIMEOUT_MS", AUTH_TIMEOUT_MS.to_string())],
    );
}

#[test]
fn legacy_providers() {
    run_script("legacy-providers", &[]);
}

fn idle_test(server_env: &[(&str, String)], expect_app_ping: bool) {
    let observe = idle_observe_ms();
    let observe_ms: u64 = observe.parse().unwrap_or(10_000);
    assert!(
        observe_ms > IDLE_TIMEOUT_MS,
        "IDLE_OBSERVE_MS ({observe_ms}) must exceed the server idle timeout ({IDLE_TIMEOUT_MS} ms)"
    );
    let timeout = SCRIPT_TIMEOUT.max(Duration::from_millis(observe_ms) + Duration::from_secs(30));
    let script_env = [
        ("IDLE_OBSERVE_MS", observe),
        (
            "EXPECT_APP_PING",
            if expect_app_ping { "1" } else { "0" }.to_owned(),
        ),
    ];
    run_script_with("idle", &script_env, server_env, timeout);
}

/// Idle providers survive a 3 s idle timeout with the default keepalive (WebSocket pings).
#[test]
fn idle() {
    idle_test(&[], false);
}

/// Same with the v4 application Ping enabled: the v4 socket gets `09` and answers `0a`; the v3
/// provider never gets `09` (it would throw).
#[test]
fn idle_app_ping() {
    idle_test(&[("HEARTH_APP_PING_INTERVAL_MS", "1000".to_owned())], true);
}

#[test]
fn y_websocket() {
    run_script("y-websocket", &[("YWS_AUTH", "1".to_owned())]);
}

#[test]
fn load_failure() {
    run_script("load-failure", &[]);
}

#[test]
fn server_reset() {
    run_script("server-reset", &[]);
}

#[test]
fn direct_connection() {
    run_script("direct-connection", &[]);
}

#[test]
fn slow_auth() {
    run_script("slow-auth", &[]);
}

#[test]
fn persistence() {
    run_script("persistence", &[]);
}
