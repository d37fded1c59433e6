//! Process and fault harness for the multi-process persistence and cluster tests.
//! Everything here talks to `hearth` only through sockets, signals and
//! files, like a real deployment.
//!
//! * [`node`] — [`NodeProcess`]: one `hearth` process (start, SIGKILL, SIGTERM, SIGSTOP/SIGCONT,
//!   restart on the same leased port, `/readyz`, log file kept per test).
//! * [`redis`] — [`RedisProcess`]: a private `redis-server` on a leased port.
//! * [`redis_cluster`] — [`RedisCluster`]: a private Redis Cluster (3 masters, 3 replicas) with
//!   its faults (SIGKILL of the master serving a key, `CLUSTER FAILOVER`).
//! * [`pg`] — [`PgDatabase`] (a fresh database on a shared server) and [`PgCluster`] (a private
//!   PostgreSQL cluster this test may stop and start).
//! * [`lb`] — [`Lb`]: a round-robin TCP load balancer over a mutable backend list.
//! * [`client`] — [`TestClient`]: a raw Hocuspocus client with a `yrs::Doc` that records every
//!   marker it sent and which of them were acknowledged.
//! * [`db`] — reading and corrupting stored rows (SQLite or PostgreSQL) from a test.
//! * [`workload`] — seeded writer tasks and the lost/phantom/duplicate set checker.
//! * [`cluster`] — [`Cluster`]: N nodes on one database and one Redis behind a balancer, with the
//!   ops-surface queries (lock holders, `/cluster/owned`, metrics, `hearth cluster …`,
//!   epochs and stored rows), [`Reconnector`] and the convergence wait.
//! * [`raw`] — [`RawSocket`]: a frame-by-frame client recording what the server sends.
//! * [`witness`] — edit → acknowledgement round trips of a client during an attack, and
//!   process probes (CPU time, resident memory).
//!
//! Every wait is bounded and ends on something observable ([`wait_until`]: a metric, a lock
//! holder, a client's state, a log line). A fixed sleep paces a workload or sets how long a
//! fault lasts; it is not how a test learns that something happened (or did not). Every child
//! process is killed when its handle drops. Handles print where their logs are when they drop
//! (libtest shows that only for failing tests), plus the last log lines of a node when the test
//! panics.
//!
//! Scratch files live in `<target>/test-scratch/<test>/`, wiped when the same test starts again.
//!
//! # Ports
//!
//! Test binaries run in parallel, so a port that was free when looked at may be taken before a
//! server binds it. The harness keeps that from happening:
//!
//! * A listener that reports its address and is never bound again binds port 0 and keeps the
//!   socket: the [`lb`] balancer, a node's operator and admin listeners (ready files; a fresh
//!   port each start).
//! * Every other port a program is told to bind comes from [`lease_port`], the only way to get
//!   one: a node's client port (bound again on restart), `redis-server` and its TLS and
//!   cluster-bus ports, PostgreSQL, a port where a test needs nothing to listen. A lease is a
//!   port outside the kernel's ephemeral range (the kernel never picks those for port 0 or
//!   outgoing connections, so only explicit binders compete), held under an exclusive `flock`
//!   on `$TMPDIR/hearth-test-ports/<port>` (so no other test process, of this or another
//!   binary, leases it until the [`PortLease`] drops) and bindable on 127.0.0.1 when leased.
//!   The lease lives as long as the handle of the server using it, restarts included: a
//!   restarted node or Redis binds a port nothing else in the harness was handed meanwhile.
//! * A program outside the harness may still bind a leased port first; the launchers then
//!   start again on fresh ports (≤ [`BIND_ATTEMPTS`] times), telling that failure apart by the
//!   server's own message ("Address already in use", "could not bind"). A Redis answers as
//!   ready only when the `process_id` it reports is the one started.

// This module is `testbed` (`src/lib.rs` includes this file by path); its files live in
// `src/harness/`.
#[path = "client.rs"]
pub mod client;
#[path = "cluster.rs"]
pub mod cluster;
#[path = "db.rs"]
pub mod db;
#[path = "lb.rs"]
pub mod lb;
#[path = "node.rs"]
pub mod node;
#[path = "pg.rs"]
pub mod pg;
#[path = "raw.rs"]
pub mod raw;
#[path = "redis.rs"]
pub mod redis;
#[path = "redis_cluster.rs"]
pub mod redis_cluster;
#[path = "tls.rs"]
pub mod tls;
#[path = "witness.rs"]
pub mod witness;
#[path = "workload.rs"]
pub mod workload;

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

pub use client::{ClientOptions, Snapshot, TestClient};
pub use cluster::{
    CliRun, Cluster, ClusterSpec, LockHolder, Metrics, Reconnector, RedisBackend, StoredRow,
    assert_nothing_lost, marker_hits, probe_writable, random_secret, wait_all_acked,
    wait_converged,
};
pub use lb::Lb;
pub use node::{NodeProcess, NodeSpec};
pub use pg::{PgCluster, PgDatabase};
pub use raw::RawSocket;
pub use redis::RedisProcess;
pub use redis_cluster::RedisCluster;
pub use tls::TestPki;
pub use workload::{History, Verdict, Writers};

/// Default bound for "this should happen soon" waits in tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `tests/interop/jwt-cases.mjs` (the real provider) over `cases` (`{label, url, doc,
/// token, expect, reason?}`) and checks that every case reported and passed; returns its output.
pub async fn run_auth_cases(cases: Vec<serde_json::Value>, url: &str) -> anyhow::Result<String> {
    let n = cases.len();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(workspace_dir().join("tests/interop/jwt-cases.mjs"))
        .env("CASES", serde_json::Value::Array(cases).to_string())
        .env("HEARTH_URL", url)
        .env("SCRIPT_TIMEOUT_MS", "120000")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(150), cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // every case reported (a script that ran nothing must not pass)
    anyhow::ensure!(
        stdout.matches(": denied").count() + stdout.matches(": read").count() == n,
        "not every case reported:\n{stdout}"
    );
    anyhow::ensure!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The cargo target directory (`$CARGO_TARGET_DIR`, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"))
}

/// A per-test scratch directory, `<target>/test-scratch/<test>/`.
///
/// Created empty (a leftover from an earlier run is removed first) and kept after the test, so
/// the logs of a failed run can be read; the next run of the same test removes it. Its path is
/// printed when the handle drops (libtest shows that output only for failing tests).
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Creates (or empties) the scratch directory of test `name`.
    pub fn new(name: &str) -> anyhow::Result<Scratch> {
        let dir = target_dir().join("test-scratch").join(name);
        if dir.exists() {
            remove_tree(&dir);
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Captured by the test harness: shown only for failing tests (or with --nocapture).
        eprintln!(
            "[testbed] scratch files (logs, databases): {}",
            self.dir.display()
        );
    }
}

/// Removes a directory tree, clearing immutable attributes a test may have set on files in it.
fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_ok() {
        return;
    }
    let _ = std::process::Command::new("chattr")
        .arg("-R")
        .arg("-i")
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(dir);
}

/// The seed for a randomised test: `$HEARTH_TEST_SEED`, else a fresh random one. Printed, so a
/// failing run can be repeated.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("HEARTH_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("[testbed] {test}: seed {seed} (repeat with HEARTH_TEST_SEED={seed})");
    seed
}

/// A loopback TCP port reserved for this process until the lease drops (see "Ports" in the
/// module docs). Keep it for as long as a server listens on the port, or as long as the test
/// relies on nothing listening there.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    /// The exclusive `flock` on the port's lock file; released when the file closes.
    _lock: File,
}

impl PortLease {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// How many attempts a launcher makes, each on fresh ports, when its server cannot bind.
pub const BIND_ATTEMPTS: usize = 5;

/// Leases a loopback TCP port for a server the test starts itself: a port outside the kernel's
/// ephemeral range, locked against every other test process, and bindable on 127.0.0.1 when
/// leased (see "Ports" in the module docs).
pub fn lease_port() -> anyhow::Result<PortLease> {
    let ports = leasable_ports();
    let dir = std::env::temp_dir().join("hearth-test-ports");
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // shared by every user's tests, like /tmp itself
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    let start = rand::random_range(0..ports.len());
    for i in 0..ports.len() {
        let port = ports[(start + i) % ports.len()];
        let path = dir.join(port.to_string());
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(&path)
        {
            Ok(f) => f,
            // another user's lock file: flock needs only a read handle
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => match File::open(&path) {
                Ok(f) => f,
                Err(_) => continue,
            },
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        // held by a process outside the harness (or lingering): try the next one
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        return Ok(PortLease { port, _lock: file });
    }
    bail!(
        "no free port to lease among {} candidates (lock files in {})",
        ports.len(),
        dir.display()
    )
}

/// The ports [`lease_port`] hands out: those outside the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`) from half its lower bound up, and above it; the
/// whole unprivileged range when nothing lies outside it.
fn leasable_ports() -> Vec<u16> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|n| n.parse::<u16>());
            match (it.next(), it.next()) {
                (Some(Ok(l)), Some(Ok(h))) if l <= h => Some((l, h)),
                _ => None,
            }
        })
        // the kernel's default
        .unwrap_or((32768, 60999));
    let below = (low / 2).max(1024)..low;
    let above = high.saturating_add(1).max(1024)..=u16::MAX;
    let mut ports: Vec<u16> = below
        .chain(above)
        .filter(|p| *p > high || *p < low)
        .collect();
    if ports.is_empty() {
        ports = (1024..=u16::MAX).collect();
    }
    ports
}

/// How often [`wait_until`] looks.
pub const POLL: Duration = Duration::from_millis(50);

/// What one look of a [`wait_until`] check found: whether the condition holds and, if it does,
/// the value to return; if not, what was seen instead.
pub trait Look {
    /// What the wait returns once the condition holds.
    type Found;
    /// `Ok` when the condition holds; else what was seen, for the timeout error (may be empty).
    fn look(self) -> Result<Self::Found, String>;
}

impl Look for bool {
    type Found = ();
    fn look(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Look for Option<T> {
    type Found = T;
    fn look(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T> Look for Result<T, String> {
    type Found = T;
    fn look(self) -> Result<T, String> {
        self
    }
}

/// Runs `check` every [`POLL`] until the condition holds, at most `limit`: `check` answers
/// `true`, `Some(value)` or `Ok(value)` ([`Look`]), and that value is returned. An error from
/// `check` ends the wait; so does the limit, with an error naming `what` and, when `check`
/// said (`Err(seen)`), what it saw last.
///
/// This is the harness's one "until something observable happened" loop: a test waits for
/// the event it depends on, never for a fixed time.
pub async fn wait_until<F, Fut, L>(
    what: &str,
    limit: Duration,
    mut check: F,
) -> anyhow::Result<L::Found>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<L>>,
    L: Look,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let seen = match check()
            .await
            .with_context(|| format!("waiting for {what}"))?
            .look()
        {
            Ok(found) => return Ok(found),
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            if seen.is_empty() {
                bail!("{what}: not within {limit:?}");
            }
            bail!("{what}: not within {limit:?}; last seen: {seen}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// True when this process runs as root (file permissions do not stop root).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Sends `sig` to `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The last `n` lines of a text file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
