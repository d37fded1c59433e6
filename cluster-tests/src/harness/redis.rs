//! A private `redis-server` for one test: a leased loopback port, no persistence, output to
//! `<scratch>/redis-<port>.log`. [`RedisProcess::restart`] brings it back on the same port with
//! no data (what a Redis restart without persistence looks like to the nodes).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use super::{BIND_ATTEMPTS, PortLease, Scratch, lease_port, signal, tail};

/// `$HEARTH_TEST_REDIS_SERVER`, else `/usr/bin/redis-server`. It must be the server itself (or
/// a script that `exec`s it): a server counts as started once it reports the process id started.
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("HEARTH_TEST_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A running `redis-server` (SIGKILLed on drop).
#[derive(Debug)]
pub struct RedisProcess {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Further `redis-server` arguments (TLS, cluster mode).
    extra: Vec<String>,
    /// The TLS port, when TLS is on.
    tls_port: Option<u16>,
    /// The client port's lease, then those of the further ports (TLS, cluster bus); dropped
    /// after the process is killed.
    _leases: Vec<PortLease>,
}

/// What a `redis-server` listens on besides its client port.
#[derive(Clone, Copy)]
enum ExtraPorts<'a> {
    /// Nothing else.
    None,
    /// `--tls-port`, serving this PKI's server certificate.
    Tls(&'a super::tls::TestPki),
    /// `--cluster-port` (the cluster bus).
    ClusterBus,
}

impl RedisProcess {
    /// Starts `redis-server --port P --save "" --appendonly no --bind 127.0.0.1` on a leased
    /// port and waits (≤ 10 s) until it answers PING.
    pub async fn start(scratch: &Scratch) -> anyhow::Result<RedisProcess> {
        Self::start_with(scratch, Vec::new()).await
    }

    /// [`RedisProcess::start`] with further `redis-server` arguments (which must not name
    /// ports: those come from [`lease_port`]).
    pub async fn start_with(scratch: &Scratch, extra: Vec<String>) -> anyhow::Result<RedisProcess> {
        Self::start_leased(scratch, extra, ExtraPorts::None).await
    }

    /// [`RedisProcess::start`] in cluster mode with `extra` arguments and a leased cluster-bus
    /// port.
    pub(super) async fn start_cluster_node(
        scratch: &Scratch,
        extra: Vec<String>,
    ) -> anyhow::Result<RedisProcess> {
        Self::start_leased(scratch, extra, ExtraPorts::ClusterBus).await
    }

    /// [`RedisProcess::start`] with a TLS port too, serving `pki`'s server certificate and
    /// requiring a client certificate signed by its CA. The plain port stays for the test's own
    /// commands.
    pub async fn start_tls(
        scratch: &Scratch,
        pki: &super::tls::TestPki,
    ) -> anyhow::Result<RedisProcess> {
        Self::start_leased(scratch, Vec::new(), ExtraPorts::Tls(pki)).await
    }

    /// Leases the ports and starts the server, again on fresh ports (≤ [`BIND_ATTEMPTS`]
    /// times) while it exits because one of them is in use.
    async fn start_leased(
        scratch: &Scratch,
        extra: Vec<String>,
        ports: ExtraPorts<'_>,
    ) -> anyhow::Result<RedisProcess> {
        let mut attempt = 1;
        loop {
            let lease = lease_port()?;
            let port = lease.port();
            let mut leases = vec![lease];
            let mut args = extra.clone();
            let mut tls_port = None;
            match ports {
                ExtraPorts::None => {}
                ExtraPorts::Tls(pki) => {
                    let lease = lease_port()?;
                    let path = |p: &PathBuf| p.display().to_string();
                    args.extend([
                        "--tls-port".into(),
                        lease.port().to_string(),
                        "--tls-cert-file".into(),
                        path(&pki.server_cert),
                        "--tls-key-file".into(),
                        path(&pki.server_key),
                        "--tls-ca-cert-file".into(),
                        path(&pki.ca),
                        "--tls-auth-clients".into(),
                        "yes".into(),
                    ]);
                    tls_port = Some(lease.port());
                    leases.push(lease);
                }
                ExtraPorts::ClusterBus => {
                    let lease = lease_port()?;
                    args.extend(["--cluster-port".into(), lease.port().to_string()]);
                    leases.push(lease);
                }
            }
            let dir = scratch.join(&format!("redis-{port}"));
            std::fs::create_dir_all(&dir)?;
            let log = scratch.join(&format!("redis-{port}.log"));
            let mut r = RedisProcess {
                port,
                dir,
                log,
                child: None,
                extra: args,
                tls_port,
                _leases: leases,
            };
            match r.launch().await {
                Ok(()) => return Ok(r),
                Err(e)
                    if attempt < BIND_ATTEMPTS
                        && std::fs::read_to_string(&r.log)
                            .is_ok_and(|l| l.contains("Address already in use")) =>
                {
                    eprintln!(
                        "[testbed] redis-server: a port was taken, again on fresh ports: {e:#}"
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `rediss://localhost:<tls port>` when TLS is on.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://localhost:{p}"))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let bin = redis_server_bin();
        if !bin.is_file() {
            bail!(
                "{} not found (install redis-server or set HEARTH_TEST_REDIS_SERVER)",
                bin.display()
            );
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(
            log,
            "===== [testbed] redis-server on port {} =====",
            self.port
        )?;
        let err = log.try_clone()?;
        let child = Command::new(&bin)
            .args(["--port", &self.port.to_string()])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = self.child.as_ref().map(Child::id);
        loop {
            // answered by this process, not by another one on the port
            if let Ok(Resp::Simple(s)) = self.command(&["PING"]).await
                && s == "PONG"
                && self.process_id().await == pid
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "redis-server exited with {status}; log {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                );
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `process_id` in `INFO server`, from whichever server answers on the port.
    async fn process_id(&self) -> Option<u32> {
        let info = self.command(&["INFO", "server"]).await.ok()?.as_str()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the process was started and not killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap (the data is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = signal(c.id(), libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (clients' commands hang until [`cont`](Self::cont)).
    pub fn stop(&self) -> anyhow::Result<()> {
        let c = self.child.as_ref().context("redis-server is not running")?;
        Ok(signal(c.id(), libc::SIGSTOP)?)
    }

    /// SIGCONT.
    pub fn cont(&self) -> anyhow::Result<()> {
        let c = self.child.as_ref().context("redis-server is not running")?;
        Ok(signal(c.id(), libc::SIGCONT)?)
    }

    /// Kills the server and starts an empty one on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    self.kill();
                    sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs one command over a fresh connection (≤ 5 s), e.g. `&["GET", key]`.
    pub async fn command(&self, args: &[&str]) -> anyhow::Result<Resp> {
        let raw: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&raw).await
    }

    /// [`command`](Self::command) with binary-safe arguments (e.g. `PUBLISH` of raw bytes).
    pub async fn command_bytes(&self, args: &[&[u8]]) -> anyhow::Result<Resp> {
        command_on(self.port, args).await
    }
}

/// Runs one command on the Redis at `127.0.0.1:port` over a fresh connection (≤ 5 s).
pub async fn command_on(port: u16, args: &[&[u8]]) -> anyhow::Result<Resp> {
    {
        let fut = async {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
            let mut req = format!("*{}\r\n", args.len()).into_bytes();
            for a in args {
                req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                req.extend_from_slice(a);
                req.extend_from_slice(b"\r\n");
            }
            s.write_all(&req).await?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some((v, _)) = Resp::parse(&buf)? {
                    return Ok(v);
                }
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!("redis closed the connection");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        timeout(Duration::from_secs(5), fut)
            .await
            .context("redis command timed out")?
    }
}

impl RedisProcess {
    /// Subscribes to `channel` on a connection of its own and collects every message published
    /// there from now on (returns once Redis confirmed the subscription, ≤ 5 s).
    pub async fn subscribe(&self, channel: &str) -> anyhow::Result<Subscription> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let req = format!(
            "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
            channel.len()
        );
        s.write_all(req.as_bytes()).await?;
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (confirmed_tx, confirmed_rx) = tokio::sync::oneshot::channel();
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut confirmed = Some(confirmed_tx);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                while let Ok(Some((v, used))) = Resp::parse(&buf) {
                    buf.drain(..used);
                    if let Resp::Array(Some(items)) = v {
                        match items.as_slice() {
                            [Resp::Bulk(Some(kind)), _, Resp::Bulk(Some(payload))]
                                if kind == b"message" =>
                            {
                                sink.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(payload.clone());
                            }
                            [Resp::Bulk(Some(kind)), ..] if kind == b"subscribe" => {
                                if let Some(tx) = confirmed.take() {
                                    let _ = tx.send(());
                                }
                            }
                            _ => {}
                        }
                    }
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        timeout(Duration::from_secs(5), confirmed_rx)
            .await
            .context("SUBSCRIBE not confirmed within 5 s")?
            .context("subscriber connection ended")?;
        Ok(Subscription { messages, task })
    }
}

/// A `SUBSCRIBE` connection collecting messages (see [`RedisProcess::subscribe`]); closed on drop.
#[derive(Debug)]
pub struct Subscription {
    messages: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// The payloads received so far, in order.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("[testbed] redis log: {}", self.log.display());
        }
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`.
    Simple(String),
    /// `-ERR …`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n …` (`None` for the null bulk string).
    Bulk(Option<Vec<u8>>),
    /// `*n …` (`None` for the null array).
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text, if it is a simple or bulk string.
    pub fn as_str(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// Parses one reply from the front of `buf`: `None` if incomplete, else the value and the
    /// bytes it used.
    pub fn parse(buf: &[u8]) -> anyhow::Result<Option<(Resp, usize)>> {
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let Some(&tag) = buf.first() else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[1..end])?;
        let after = end + 2;
        Ok(Some(match tag {
            b'+' => (Resp::Simple(line.to_string()), after),
            b'-' => (Resp::Error(line.to_string()), after),
            b':' => (Resp::Int(line.parse()?), after),
            b'$' => {
                let n: i64 = line.parse()?;
                if n < 0 {
                    (Resp::Bulk(None), after)
                } else {
                    let n = n as usize;
                    if buf.len() < after + n + 2 {
                        return Ok(None);
                    }
                    (
                        Resp::Bulk(Some(buf[after..after + n].to_vec())),
                        after + n + 2,
                    )
                }
            }
            b'*' => {
                let n: i64 = line.parse()?;
                if n < 0 {
                    (Resp::Array(None), after)
                } else {
                    let mut items = Vec::new();
                    let mut pos = after;
                    for _ in 0..n {
                        let Some((v, used)) = Resp::parse(&buf[pos..])? else {
                            return Ok(None);
                        };
                        items.push(v);
                        pos += used;
                    }
                    (Resp::Array(Some(items)), pos)
                }
            }
            other => bail!("unexpected RESP tag {other:#x}"),
        }))
    }
}
