//! Test harness: a private `redis-server` per test, fred clients, and a recording observer.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use hearth_lock::{
    AcquireOutcome, HolderId, LockClient, LockObserver, LockTiming, LossReason, RefreshOutcome,
    ReleaseOutcome,
};
use tokio::time::Instant;

/// A `redis-server` child process on a free loopback port; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

fn redis_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(path);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/bin/redis-server")
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn spawn_redis(port: u16) -> Child {
    Command::new(redis_binary())
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server (set REDIS_SERVER if it is not on PATH)")
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Waits until `PING` works; `false` if the child exited or 5 s passed.
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        if ping(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl RedisServer {
    /// Starts a server on a free port (retrying a few ports in case of a race).
    pub fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn_redis(port);
            if wait_ready(&mut child, port) {
                return Self {
                    child: Some(child),
                    port,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis is running").id()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
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
        let mut child = spawn_redis(self.port);
        assert!(
            wait_ready(&mut child, self.port),
            "redis did not restart on port {}",
            self.port
        );
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        self.kill();
    }
}

/// A connected fred client with a fast reconnect policy.
pub async fn redis_client(port: u16) -> Client {
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).expect("valid url");
    let client = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_constant(0, 50))
        .with_connection_config(|c| c.connection_timeout = Duration::from_millis(500))
        .build()
        .expect("build fred client");
    client.init().await.expect("connect to redis");
    client
}

/// Short timings so the suite runs in seconds: ttl 900 ms, refresh 300 ms, margin 180 ms.
pub fn test_timing() -> LockTiming {
    LockTiming::from_ttl(Duration::from_millis(900)).expect("valid timing")
}

/// A lock client for `node_id` with a fresh nonce and a recording observer.
pub async fn lock_client(port: u16, node_id: &str) -> (LockClient, Arc<Recorder>) {
    lock_client_for(port, HolderId::new(node_id).expect("valid node id")).await
}

/// A lock client for an explicit holder, with a recording observer.
pub async fn lock_client_for(port: u16, holder: HolderId) -> (LockClient, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let client = LockClient::new(redis_client(port).await, "test", holder, test_timing())
        .expect("valid lock client")
        .with_observer(recorder.clone());
    (client, recorder)
}

/// One observed event, with the instant the observer was called.
#[derive(Clone, Debug)]
pub enum Event {
    Acquire(Instant, Duration, AcquireOutcome),
    Refresh(Instant, Duration, RefreshOutcome),
    Lost(Instant, String, LossReason),
    Release(Instant, Duration, ReleaseOutcome),
}

/// Records every observer call.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn push(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }

    /// Number of successful refreshes.
    pub fn refreshes_ok(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Refresh(_, _, RefreshOutcome::Refreshed)))
            .count()
    }

    /// Send time (completion − latency) of the last successful refresh.
    pub fn last_ok_refresh_sent(&self) -> Option<Instant> {
        self.events().iter().rev().find_map(|e| match e {
            Event::Refresh(at, latency, RefreshOutcome::Refreshed) => Some(*at - *latency),
            _ => None,
        })
    }

    /// Loss reasons reported.
    pub fn losses(&self) -> Vec<LossReason> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Lost(_, _, reason) => Some(reason),
                _ => None,
            })
            .collect()
    }
}

impl LockObserver for Recorder {
    fn on_acquire(&self, latency: Duration, outcome: AcquireOutcome) {
        self.push(Event::Acquire(Instant::now(), latency, outcome));
    }
    fn on_refresh(&self, latency: Duration, outcome: RefreshOutcome) {
        self.push(Event::Refresh(Instant::now(), latency, outcome));
    }
    fn on_lost(&self, resource: &str, reason: &LossReason) {
        self.push(Event::Lost(
            Instant::now(),
            resource.to_owned(),
            reason.clone(),
        ));
    }
    fn on_release(&self, latency: Duration, outcome: ReleaseOutcome) {
        self.push(Event::Release(Instant::now(), latency, outcome));
    }
}

/// Runs a test body with an overall time limit.
pub async fn with_timeout<F: std::future::Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(30), body)
        .await
        .expect("test exceeded its 30 s limit");
}
