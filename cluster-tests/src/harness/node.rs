//! One `hearth` process under test control.
//!
//! The binary is `$HEARTH_BIN`, else `<target>/release/hearth`, else `<target>/debug/hearth`.
//! It is started as `hearth --listen 127.0.0.1:<port> --ready-file F --operator-listen
//! 127.0.0.1:0 --operator-ready-file F.operator --node-id ID --database-url URL <args…>` with
//! `<env…>`, stdout and stderr appended to `<scratch>/node-<id>.log`. [`NodeProcess::start`]
//! returns once the ready files name the bound addresses. The client port is leased
//! ([`lease_port`]) for as long as the handle lives, so a restart binds the same port, which no
//! other test is handed in between: clients and load balancers keep their URL. The operator
//! and admin listeners (`/metrics`, `/cluster/owned`) bind port 0 and get a fresh port each
//! start ([`NodeProcess::operator_addr`]).
//!
//! Cluster settings go in [`NodeSpec::env`] (`HEARTH_REDIS_URL`, `HEARTH_LOCK_TTL_MS`, …) or
//! [`NodeSpec::args`]; the node id is always passed as `--node-id`. `HEARTH_*` variables of the
//! test process itself are not inherited, so only the spec configures a node.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep, timeout};

use super::cluster::Metrics;
use super::{BIND_ATTEMPTS, PortLease, Scratch, lease_port, signal, tail, target_dir};

/// How long a node may take to write its ready file.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd node may take to exit (hearth's own shutdown timeout is 10 s).
pub const TERM_TIMEOUT: Duration = Duration::from_secs(20);

/// The `hearth` binary to run; the error says how to get one.
pub fn hearth_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HEARTH_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("HEARTH_BIN={} is not a file", p.display());
    }
    let target = target_dir();
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("hearth");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "no hearth binary: looked for $HEARTH_BIN, {0}/release/hearth and {0}/debug/hearth — \
         run `cargo build --release -p hearth` first (or set HEARTH_BIN)",
        target.display()
    )
}

/// What to run: everything but the listen address and ready file.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `--node-id` (also names the log file).
    pub node_id: String,
    /// `--database-url`.
    pub database_url: String,
    /// Further command-line arguments.
    pub args: Vec<String>,
    /// Environment variables for the child. `HEARTH_*` variables of the test's own environment
    /// are not passed on; everything else is.
    pub env: Vec<(String, String)>,
    /// The server binary (default: [`hearth_bin`]).
    pub bin: Option<PathBuf>,
}

impl NodeSpec {
    /// A node with id `node_id` on `database_url`, no further settings.
    pub fn new(node_id: impl Into<String>, database_url: impl Into<String>) -> NodeSpec {
        NodeSpec {
            node_id: node_id.into(),
            database_url: database_url.into(),
            args: Vec::new(),
            env: Vec::new(),
            bin: None,
        }
    }

    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> NodeSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeSpec {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running (or stopped, until restarted) `hearth` process. Dropping it SIGKILLs the process.
#[derive(Debug)]
pub struct NodeProcess {
    spec: NodeSpec,
    bin: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    operator: SocketAddr,
    admin: Option<SocketAddr>,
    starts: u32,
    last_exit: Option<ExitStatus>,
    /// The client port, held until the handle drops (after the process is killed).
    lease: PortLease,
}

impl NodeProcess {
    /// Starts a node on a leased port and waits (≤ [`START_TIMEOUT`]) until it listens.
    pub async fn start(scratch: &Scratch, spec: NodeSpec) -> anyhow::Result<NodeProcess> {
        NodeProcess::start_in(scratch.path(), spec).await
    }

    /// [`NodeProcess::start`] with its ready files and log (`node-<id>.log`) in `dir`.
    pub async fn start_in(dir: &Path, spec: NodeSpec) -> anyhow::Result<NodeProcess> {
        let bin = match &spec.bin {
            Some(b) => b.clone(),
            None => hearth_bin()?,
        };
        let dir = dir.to_path_buf();
        let log = dir.join(format!("node-{}.log", spec.node_id));
        let lease = lease_port()?;
        let mut node = NodeProcess {
            spec,
            bin,
            dir,
            log,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], lease.port())),
            operator: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            starts: 0,
            last_exit: None,
            lease,
        };
        // A program outside the harness may have bound the leased port: again on a fresh one.
        let mut attempt = 1;
        loop {
            match node.launch().await {
                Ok(()) => return Ok(node),
                Err(e) if attempt < BIND_ATTEMPTS && node.port_was_taken() => {
                    eprintln!(
                        "[testbed] node {}: port taken, again on a fresh one: {e:#}",
                        node.id()
                    );
                    node.lease = lease_port()?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the last start failed because its client port was in use.
    fn port_was_taken(&self) -> bool {
        tail(&self.log, 5).contains("in use")
    }

    /// Starts the process on the leased port and waits until its ready files are written.
    async fn launch(&mut self) -> anyhow::Result<()> {
        let port = self.lease.port();
        self.starts += 1;
        let ready = self
            .dir
            .join(format!("node-{}.ready{}", self.spec.node_id, self.starts));
        let operator_ready = ready.with_extension(format!("operator{}", self.starts));
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&operator_ready);
        let admin_ready = ready.with_extension(format!("admin{}", self.starts));
        let _ = std::fs::remove_file(&admin_ready);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(
            log,
            "===== [testbed] start #{} of node {} (port {port}) =====",
            self.starts, self.spec.node_id
        )?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(&self.bin);
        // Only the spec configures the node: settings from the test's own environment
        // (a developer's HEARTH_REDIS_URL, say) must not leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HEARTH_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ready-file")
            .arg(&ready)
            .arg("--operator-listen")
            .arg("127.0.0.1:0")
            .arg("--operator-ready-file")
            .arg(&operator_ready)
            // written only when the spec gives the node admin tokens
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--admin-ready-file")
            .arg(&admin_ready)
            .arg("--node-id")
            .arg(&self.spec.node_id)
            .arg("--database-url")
            .arg(&self.spec.database_url)
            .args(&self.spec.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.last_exit = None;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // hearth writes the operator file first
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                let text = std::fs::read_to_string(&operator_ready).with_context(|| {
                    format!("node {} wrote no operator ready file", self.spec.node_id)
                })?;
                self.operator = text.trim().parse().with_context(|| {
                    format!(
                        "operator ready file of node {}: {text:?}",
                        self.spec.node_id
                    )
                })?;
                self.admin = std::fs::read_to_string(&admin_ready)
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                self.addr = addr;
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "node {} exited with {status} before listening; log {}:\n{}",
                    self.spec.node_id,
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            if Instant::now() > deadline {
                let _ = self.kill();
                bail!(
                    "node {} wrote no ready file within {START_TIMEOUT:?}; log {}:\n{}",
                    self.spec.node_id,
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// The node id.
    pub fn id(&self) -> &str {
        &self.spec.node_id
    }

    /// What it runs with.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// Changes what the next [`restart`](Self::restart) runs with.
    pub fn spec_mut(&mut self) -> &mut NodeSpec {
        &mut self.spec
    }

    /// The address it listens on (kept across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The operator listener of the current process (`/metrics`, `/cluster/owned`); it
    /// changes on restart.
    pub fn operator_addr(&self) -> SocketAddr {
        self.operator
    }

    /// The admin API's address (`http://…` base), when the node runs with admin tokens.
    pub fn admin_url(&self) -> Option<String> {
        self.admin.map(|a| format!("http://{a}"))
    }

    /// One admin API request with `token` (`Connection: close`): the status and the JSON
    /// body (`Null` when it is not JSON).
    pub async fn admin_call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let addr = self
            .admin
            .ok_or_else(|| anyhow::anyhow!("{} has no admin listener", self.id()))?;
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(70), tcp.read_to_end(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf).into_owned();
        anyhow::ensure!(text.len() > 12, "short answer {text:?}");
        let status: u16 = text[9..12].parse()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// `ws://ip:port/`.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// The log file (all starts of this node, separated by marker lines).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process id of the current process, if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// The exit status of the last process, once it exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.last_exit
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if let Some(s) = self.last_exit {
            return Ok(Some(s));
        }
        let Some(child) = self.child.as_mut() else {
            bail!("node {} was never started", self.spec.node_id);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.last_exit = status;
        }
        Ok(status)
    }

    /// Sends any signal to the running process.
    pub fn send_signal(&mut self, sig: libc::c_int) -> anyhow::Result<()> {
        self.send(sig)
    }

    fn send(&mut self, sig: libc::c_int) -> anyhow::Result<()> {
        if self.try_wait()?.is_some() {
            bail!("node {} is not running", self.spec.node_id);
        }
        let pid = self.pid().context("no process")?;
        signal(pid, sig).with_context(|| format!("signal {sig} to node {}", self.spec.node_id))
    }

    /// SIGKILL and reap. Killing an exited node returns its earlier status.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        let child = self.child.as_mut().context("no process")?;
        let pid = child.id();
        let _ = signal(pid, libc::SIGCONT);
        child.kill()?;
        let status = child.wait()?;
        self.last_exit = Some(status);
        Ok(status)
    }

    /// SIGTERM, then wait (≤ `limit`) for the exit status. Past the limit the process is
    /// SIGKILLed and an error returned.
    pub async fn term_within(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        self.send(libc::SIGTERM)?;
        match self.wait_exit(limit).await {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = self.kill();
                Err(e.context("after SIGTERM"))
            }
        }
    }

    /// SIGTERM and wait (≤ [`TERM_TIMEOUT`]) for the exit status.
    pub async fn term(&mut self) -> anyhow::Result<ExitStatus> {
        self.term_within(TERM_TIMEOUT).await
    }

    /// Waits (≤ `limit`) until the process exits.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} still running {limit:?} later; log {}",
                    self.spec.node_id,
                    self.log.display()
                );
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGSTOP: the process freezes (its sockets stay open, the kernel keeps buffering).
    ///
    /// Returns once every thread of the process is stopped, not when `kill` returns: the kernel
    /// stops a process's threads only as each is next scheduled, so on a loaded machine the
    /// process can run on for milliseconds after the signal was sent (reading sockets,
    /// committing), which would make "sent while frozen" untrue.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.send(libc::SIGSTOP)?;
        let pid = self.pid().context("no process")?;
        let sent = std::time::Instant::now();
        let deadline = sent + Duration::from_secs(5);
        loop {
            match all_threads_stopped(pid) {
                Ok(true) => {
                    let waited = sent.elapsed();
                    if waited > Duration::from_millis(1) {
                        eprintln!(
                            "[testbed] node {} stopped {waited:?} after SIGSTOP",
                            self.spec.node_id
                        );
                    }
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => return Err(e.context(format!("node {}", self.spec.node_id))),
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "node {} did not stop within 5 s of SIGSTOP",
                    self.spec.node_id
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.send(libc::SIGCONT)
    }

    /// Starts the node again on the same port with the same spec (SIGKILLs it first if it still
    /// runs) and waits until it listens. The port stayed leased to this handle, so nothing
    /// else in the harness was handed it meanwhile.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.launch().await
    }

    /// `GET path` on the client port over plain HTTP/1.1 (≤ 5 s): the status code and the body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.addr, path).await
    }

    /// `GET path` on the operator listener (`/metrics`, `/cluster/owned`, `/readyz` with its
    /// reason) over plain HTTP/1.1 (≤ 5 s).
    pub async fn operator_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.operator, path).await
    }

    /// One scrape of `/metrics` (operator listener); an answer other than 200 is an error.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = self.operator_get("/metrics").await?;
        if status != 200 {
            bail!("/metrics on {} answered {status}", self.id());
        }
        Ok(Metrics::parse(&body))
    }

    /// The status code of `GET /readyz`.
    pub async fn readyz(&self) -> anyhow::Result<u16> {
        Ok(self.http_get("/readyz").await?.0)
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(None) = child.try_wait()
        {
            let _ = signal(child.id(), libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        // Captured by the test harness: shown only for failing tests (or with --nocapture).
        eprintln!(
            "[testbed] node {} log: {}",
            self.spec.node_id,
            self.log.display()
        );
        if std::thread::panicking() {
            eprintln!("--- last lines ---\n{}\n---", tail(&self.log, 25));
        }
    }
}

/// `GET path` on `addr` over HTTP/1.1 with `Connection: close` (≤ 5 s).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = timeout(Duration::from_secs(5), fut)
        .await
        .with_context(|| format!("GET {path} on {addr} timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Whether every thread of `pid` is stopped (state `T`/`t`) or gone (`Z`/`X`), from
/// `/proc/<pid>/task/*/stat`.
fn all_threads_stopped(pid: u32) -> anyhow::Result<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).context("reading /proc")?;
    for task in tasks {
        let stat = match std::fs::read_to_string(task?.path().join("stat")) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // thread exited
            Err(e) => return Err(e.into()),
        };
        // `pid (comm) state …`; comm may contain spaces and parentheses
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .context("unparsable /proc stat")?;
        if !matches!(state, "T" | "t" | "Z" | "X") {
            return Ok(false);
        }
    }
    Ok(true)
}
