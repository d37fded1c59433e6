//! A private `redis-server` for one test (no persistence, killed on drop), used by the
//! integration tests of `hearth-lock` and, through a `#[path]` module, of `hearth-proxy`.
//!
//! Test binaries run in parallel, so a port picked as free may be bound by someone else before
//! the server binds it. Two rules keep that from going unnoticed or hitting other tests:
//!
//! * The port is picked at random below the kernel's ephemeral range (the kernel never picks
//!   those for port 0 or outgoing connections, so only programs binding a port by number
//!   compete for it) and below the ports the cluster tests lease (those start at half the
//!   range's lower bound), so what competes is another of these servers or a program outside
//!   the tests.
//! * A server counts as started only when the process answering on the port reports the pid
//!   spawned (`process_id` in `INFO server`); else it is killed and started again on another
//!   port (≤ [`ATTEMPTS`] times). [`RedisServer::restart`] binds the same port again and fails
//!   loudly, not silently, should another server have taken it meanwhile.

use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many ports [`RedisServer::start`] tries.
const ATTEMPTS: usize = 10;

/// A `redis-server` child process on a loopback port; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts a server on a random port (see the module docs) and waits until it answers.
    pub fn start() -> RedisServer {
        for _ in 0..ATTEMPTS {
            let port = random_port();
            if let Some(child) = spawn_on(port) {
                return RedisServer {
                    child: Some(child),
                    port,
                };
            }
        }
        panic!("redis-server did not start on any of {ATTEMPTS} ports");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let child = spawn_on(self.port).unwrap_or_else(|| {
            panic!(
                "redis-server did not start again on port {} (taken meanwhile?)",
                self.port
            )
        });
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        self.kill();
    }
}

/// `$REDIS_SERVER`, else `redis-server` on `$PATH`, else `/usr/bin/redis-server`.
fn redis_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("redis-server"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A random port from 1024 up to half the lower bound of the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`).
fn random_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let span = (low / 2).max(2048) - 1024;
    // each RandomState has fresh random keys
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    1024 + u16::try_from(random % u64::from(span)).unwrap_or_default()
}

/// Spawns `redis-server` on `port` and waits (≤ 5 s) until it is the process answering there;
/// `None` (the child reaped) when it exits first (its port was taken) or does not answer.
fn spawn_on(port: u16) -> Option<Child> {
    let mut child = Command::new(redis_binary())
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server (set REDIS_SERVER if it is not on PATH)");
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return None;
        }
        if served_pid(port) == Some(child.id()) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The `process_id` that the server answering on `port` reports in `INFO server`.
fn served_pid(port: u16) -> Option<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    // a bulk string: `$<length>\r\n<text>\r\n`
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let len: usize = header.strip_prefix('$')?.trim().parse().ok()?;
    let mut text = vec![0; len];
    reader.read_exact(&mut text).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()
}
