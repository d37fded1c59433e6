//! Test harness: a private `redis-server` per test and bounded transport helpers.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

// the same server as the lock crate's tests
#[path = "../../../lock/tests/common/redis_server.rs"]
mod redis_server;
pub use redis_server::RedisServer;

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
