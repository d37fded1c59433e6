//! Test harness: a private `redis-server` per test, fred clients, and a recording observer.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use hearth_lock::{
    AcquireOutcome, HolderId, LockClient, LockObserver, LockTiming, LossReason, RefreshOutcome,
    ReleaseOutcome,
};
use tokio::time::Instant;

mod redis_server;
pub use redis_server::RedisServer;

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
