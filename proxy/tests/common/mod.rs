//! A throwaway `redis-server` per test: free port, no persistence, killed on drop.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A running `redis-server` on 127.0.0.1; killed when dropped.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        // The port can be taken by someone else between probing and binding: retry.
        for _attempt in 0..5 {
            let port = {
                let probe = TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap().port()
            };
            let mut child = Command::new(REDIS_SERVER)
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    &std::env::temp_dir().display().to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {REDIS_SERVER}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (port taken?): retry with another port
                }
                if ping(port) {
                    return RedisServer { child, port };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not come up");
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// How long the transport helpers below wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// Connects a transport (bounded by [`WAIT`]).
pub async fn connect(
    config: hearth_proxy::TransportConfig,
) -> (hearth_proxy::Transport, hearth_proxy::InboundReceiver) {
    tokio::time::timeout(WAIT, hearth_proxy::Transport::connect(config))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// The next inbound event (bounded by [`WAIT`]).
pub async fn next(rx: &mut hearth_proxy::InboundReceiver) -> hearth_proxy::Inbound {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no inbound event in time")
        .expect("inbound channel closed")
}

/// Asserts that nothing arrives for a short while.
pub async fn quiet(rx: &mut hearth_proxy::InboundReceiver) {
    if let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        panic!("unexpected event {event:?}");
    }
}
